"""The step scheduler (`llada-v serve --scheduler step`, the default): continuous batching for masked diffusion.

One thread loops over scheduler steps. Every step it
1. retires the requests whose client went away (`GenerationJob.cancelled`, set by the HTTP layer, or `cancel`):
   their rows leave before the next forward;
2. admits waiting requests, first come first served, while the running batch stays within `max_batch_tokens`
   canvas tokens (prompt with its image tokens + `max_tokens` + suffix, twice with guidance) and `max_batch_size`
   requests; a joining request's prompt and images are encoded then (`start_denoising`);
3. runs one denoising pass of every running request (`LladaVDenoisingBatch.step`): the plain passes of all of them
   in one forward, the cached, guided and dLLM-Cache passes in their own, each request with its own settings,
   schedule, stops and (seeded) random generator;
4. streams each request's newly final text (`batching.StreamingCallback`) and answers finished requests at once.

At temperature 0 each answer is the one its own `diffusion_generate` call gives, whatever joins or leaves when; a
seeded request's answer is its seed's whatever else runs. Errors stay with their request: a request that cannot
start (its prompt does not fit, an image the processor refuses) or whose pass fails is answered with the error
and leaves; the others go on (a failing forward shared by several requests fails them all, as in a batch).
"""

from __future__ import annotations

import collections
import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..inference import decode_answer, prepare_inputs
from ..sampling_llada_v import ClassifierFreeGuidance
from .batching import GenerationJob, JobResult, StreamEvent, StreamingCallback, job_results
from .metrics import ServingMetrics

logger = logging.getLogger(__name__)


class RequestCancelled(Exception):
    """The request's client went away; its row left the running batch."""


@dataclass
class Ticket:
    """One submitted request in the engine: waiting, then running (`run`), then answered through `done`."""

    job: GenerationJob
    done: Callable[[JobResult], None]
    submitted: float
    run: Any = None  # LladaVDenoisingRun once admitted
    cost: int = 0  # canvas tokens it holds in the running batch
    callback: StreamingCallback | None = None
    first_text: bool = False
    most_running: int = 0  # the most requests running together while it ran (the x-llada-batch-size header)


class StepEngine:
    """Continuous batching on one model: `submit` from any thread, `start` the loop thread (or call `step`)."""

    def __init__(self, model: Any, processor: Any, max_batch_tokens: int, max_batch_size: int,
                 metrics: ServingMetrics | None = None) -> None:  # fmt: skip
        from ..denoising_llada_v import LladaVDenoisingBatch

        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(
                f"max_batch_tokens ({max_batch_tokens}) and max_batch_size ({max_batch_size}) must be >= 1"
            )
        self.model, self.processor = model, processor
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.metrics = metrics if metrics is not None else ServingMetrics("step")
        self.batch = LladaVDenoisingBatch(model)
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.running: list[Ticket] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.finished_seconds = 0.0  # summed over answered requests (Retry-After estimates)
        self.finished = 0
        self.steps, self.step_seconds, self.largest_batch = 0, 0.0, 0  # (`/health`)

    # ------------------------------------------------------------------ any thread

    def submit(self, job: GenerationJob, done: Callable[[JobResult], None]) -> Ticket:
        """Queue `job`; `done(result)` is called once, from the engine thread, when it is answered or failed."""
        ticket = Ticket(job, done, time.perf_counter())
        with self._wake:
            self.waiting.append(ticket)
            self.metrics.set("llada_v_waiting_requests", len(self.waiting))
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: the request leaves before the next forward (answered with `RequestCancelled`)."""
        with self._wake:
            ticket.job.cancelled = True
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llada-v-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - a bug must not end the loop: fail the running requests
                logger.exception("engine step failed")
                for ticket in list(self.running):
                    self._answer(ticket, JobResult(error=err))

    # ------------------------------------------------------------------ the engine thread

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler step: retire cancelled requests, admit, one pass of every running request, answer the
        finished. Returns False when there was nothing to do."""
        started = time.perf_counter()
        for ticket in [t for t in self.running if t.job.cancelled]:
            self._answer(ticket, JobResult(error=RequestCancelled("the client went away")), cancelled=True)
        self._admit()
        if not self.running:
            return False
        for ticket in self.running:
            ticket.most_running = max(ticket.most_running, len(self.running))
        self.largest_batch = max(self.largest_batch, len(self.running))
        try:
            report = self.batch.step()
        except Exception as err:  # noqa: BLE001 - the requests of the failed pass get the error, the loop goes on
            logger.warning("a pass of %d requests failed (%s: %s)", len(self.running), type(err).__name__, err)
            for ticket in list(self.running):
                self._answer(ticket, JobResult(error=err))
            return True
        self.metrics.forwards(report.forward_rows)
        by_run = {id(t.run): t for t in self.running}
        for run in report.finished:
            self._finish(by_run[id(run)])
        seconds = time.perf_counter() - started
        self.metrics.observe("llada_v_step_seconds", seconds)
        self.steps, self.step_seconds = self.steps + 1, self.step_seconds + seconds
        return True

    def _admit(self) -> None:
        """Waiting requests join, first come first served, within the budgets. Only this thread takes requests out
        of `waiting` (others append), so the heavy work (encoding a prompt) runs without the lock."""
        with self._wake:
            gone = [t for t in self.waiting if t.job.cancelled]
            for ticket in gone:
                self.waiting.remove(ticket)
        for ticket in gone:
            self._answer(ticket, JobResult(error=RequestCancelled("the client went away")), cancelled=True)
        used = sum(t.cost for t in self.running)
        while len(self.running) < self.max_batch_size:
            with self._wake:
                if not self.waiting:
                    break
                ticket = self.waiting[0]
            if ticket.run is None and not self._start(ticket):
                with self._wake:
                    self.waiting.popleft()  # it could not start and was answered with the error
                continue
            if self.running and used + ticket.cost > self.max_batch_tokens:
                break  # first come, first served: later requests wait too, so a large one is never starved
            with self._wake:
                self.waiting.popleft()
            self.running.append(ticket)
            self.batch.add(ticket.run)
            used += ticket.cost
        self.metrics.set("llada_v_waiting_requests", len(self.waiting))
        self.metrics.set("llada_v_running_requests", len(self.running))

    def _start(self, ticket: Ticket) -> bool:
        """Encode the request's prompt and images and start its run; False (the request answered with the error)
        when it cannot start."""
        job, model = ticket.job, self.model
        try:
            inputs = job.inputs or prepare_inputs(self.processor, [job.text], [job.images], model.device)
            inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            config = copy.deepcopy(job.config)
            config.return_dict_in_generate = True
            stops, _ = model._stops_and_suffix(config, self.processor.tokenizer)
            if job.sink is not None:
                ticket.callback = StreamingCallback(self.processor.tokenizer, config, [job], stops)
            generator = None
            if job.stochastic and job.seed is not None:
                generator = torch.Generator(device=model.device).manual_seed(job.seed)
            ticket.run = model.start_denoising(
                **inputs, generation_config=config, generator=generator, tokenizer=self.processor.tokenizer,
                step_callback=None if ticket.callback is None else self._streaming(ticket),
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - this request's failure only
            self._answer(ticket, JobResult(error=err))
            return False
        copies = ClassifierFreeGuidance(config.cfg_scale).copies
        ticket.cost = ticket.run.state.total_len * ticket.run.batch_size * copies
        job.emit(StreamEvent("started", batch_size=len(self.running) + 1))
        return True

    def _streaming(self, ticket: Ticket) -> Callable[[Any], None]:
        def callback(step: Any) -> None:
            before = ticket.job.streamed
            ticket.callback(step)
            if ticket.job.streamed and not before and not ticket.first_text:
                ticket.first_text = True
                self.metrics.observe("llada_v_time_to_first_token_seconds", time.perf_counter() - ticket.submitted)

        return callback

    def _finish(self, ticket: Ticket) -> None:
        run = ticket.run
        try:
            output = run.finalize()
            tokenizer = self.processor.tokenizer
            answers = [decode_answer(tokenizer, ids, run.config.stop_strings) for ids in output.answer_ids()]
            if ticket.callback is not None:
                ticket.callback.finish([answers[0].text])
            result = job_results(answers, output, run.config, batch_size=ticket.most_running)[0]
        except Exception as err:  # noqa: BLE001 - this request's failure only
            result = JobResult(error=err)
        self.metrics.add("llada_v_answer_tokens_total", result.completion_tokens)
        self._answer(ticket, result)

    def _answer(self, ticket: Ticket, result: JobResult, cancelled: bool = False) -> None:
        if ticket in self.running:
            self.running.remove(ticket)
            if ticket.run is not None:
                self.batch.remove(ticket.run)
        seconds = time.perf_counter() - ticket.submitted
        self.metrics.add("llada_v_requests_total")
        if cancelled:
            self.metrics.add("llada_v_requests_cancelled_total")
        elif result.error is None:
            self.metrics.observe("llada_v_request_seconds", seconds)
            self.finished_seconds += seconds
            self.finished += 1
        self.metrics.set("llada_v_running_requests", len(self.running))
        try:
            ticket.done(result)
        except Exception:  # noqa: BLE001 - a broken receiver must not stop the engine
            logger.exception("delivering a result failed")
