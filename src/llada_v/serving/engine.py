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

from ..inference import decode_answer_at_stop, prepare_inputs
from ..sampling_llada_v import ClassifierFreeGuidance
from .batching import GenerationJob, JobResult, StreamEvent, StreamingCallback, group_jobs, job_result
from .metrics import ServingMetrics

logger = logging.getLogger(__name__)


class RequestCancelled(Exception):
    """The request's client went away; its row left the running batch."""


@dataclass
class Ticket:
    """One submitted request in the engine: waiting, then a row (`row`) of a running `run`, then answered."""

    job: GenerationJob
    done: Callable[[JobResult], None]
    submitted: float
    canvas: int = 0  # its canvas tokens: prompt (with image tokens) + answer + suffix
    copies: int = 1  # rows per forward (2 with guidance)
    run: Any = None  # the LladaVDenoisingRun it is a row of, once admitted
    row: int = 0
    callback: StreamingCallback | None = None  # its run's
    first_text: bool = False
    most_running: int = 0  # the most requests running together while it ran (the x-llada-batch-size header)


class StepEngine:
    """Continuous batching on one model: `submit` from any thread, `start` the loop thread (or call `step`).

    Requests admitted at the same step with equal settings (`batching.settings_key`: a seeded random request is
    alone) start as one left-padded run, so their images are encoded in one vision forward; each row is answered as
    soon as it is finished, and a cancelled row is dropped from its run."""

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
                self.batch.runs.clear()

    # ------------------------------------------------------------------ the engine thread

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduler step: retire cancelled requests, admit, one pass of every running request, answer the
        finished. Returns False when there was nothing to do."""
        started = time.perf_counter()
        for ticket in [t for t in self.running if t.job.cancelled]:
            ticket.run.drop_row(ticket.row)
            self._answer(ticket, JobResult(error=RequestCancelled("the client went away")), cancelled=True)
        admitting = time.perf_counter()
        self._admit()
        self.metrics.add("llada_v_admission_seconds_total", time.perf_counter() - admitting)
        if not self.running:
            return False
        for ticket in self.running:
            ticket.most_running = max(ticket.most_running, len(self.running))
        self.largest_batch = max(self.largest_batch, len(self.running))
        passing = time.perf_counter()
        try:
            report = self.batch.step()
        except Exception as err:  # noqa: BLE001 - the requests of the failed pass get the error, the loop goes on
            logger.warning("a pass of %d requests failed (%s: %s)", len(self.running), type(err).__name__, err)
            for ticket in list(self.running):
                self._answer(ticket, JobResult(error=err))
            self.batch.runs.clear()
            return True
        self.metrics.add("llada_v_pass_seconds_total", time.perf_counter() - passing)
        self.metrics.forwards(report.forward_rows)
        runs = {id(t.run): t.run for t in self.running}
        finished = {key: run.finished_rows() for key, run in runs.items()}  # one host read per run, not per row
        for ticket in [t for t in self.running if t.row in finished[id(t.run)]]:
            self._finish(ticket)
        seconds = time.perf_counter() - started
        self.metrics.observe("llada_v_step_seconds", seconds)
        self.steps, self.step_seconds = self.steps + 1, self.step_seconds + seconds
        return True

    def _admit(self) -> None:
        """Waiting requests join, first come first served, while the running requests times the longest canvas
        among them (the tokens of their shared, left-padded forward; twice for guided rows) stays within
        `max_batch_tokens` and at most `max_batch_size` requests run. Only this thread takes requests out of
        `waiting` (others append), so the heavy work (the processor, encoding prompts) runs without the lock."""
        with self._wake:
            gone = [t for t in self.waiting if t.job.cancelled]
            for ticket in gone:
                self.waiting.remove(ticket)
        for ticket in gone:
            self._answer(ticket, JobResult(error=RequestCancelled("the client went away")), cancelled=True)
        admitted: list[Ticket] = []
        while len(self.running) + len(admitted) < self.max_batch_size:
            with self._wake:
                if not self.waiting:
                    break
                ticket = self.waiting[0]
            if not ticket.canvas and not self._measure(ticket):
                with self._wake:
                    self.waiting.popleft()  # it could not be prepared and was answered with the error
                continue
            joined = [*self.running, *admitted, ticket]
            tokens = sum(t.copies for t in joined) * max(t.canvas for t in joined)
            if (self.running or admitted) and tokens > self.max_batch_tokens:
                break  # first come, first served: later requests wait too, so a large one is never starved
            with self._wake:
                self.waiting.popleft()
            admitted.append(ticket)
        for group in group_jobs([t.job for t in admitted]):
            self._start([admitted[i] for i in group])
        self.metrics.set("llada_v_waiting_requests", len(self.waiting))
        self.metrics.set("llada_v_running_requests", len(self.running))

    def _measure(self, ticket: Ticket) -> bool:
        """The request's processor outputs (kept on the job) and canvas tokens; False (answered with the error)
        when the processor or the settings refuse it."""
        job = ticket.job
        try:
            if job.inputs is None:
                job.inputs = prepare_inputs(self.processor, [job.text], [job.images], torch.device("cpu"))
            _, suffix = self.model._stops_and_suffix(job.config, self.processor.tokenizer)
        except Exception as err:  # noqa: BLE001 - this request's failure only
            self._answer(ticket, JobResult(error=err))
            return False
        ticket.canvas = int(job.inputs["input_ids"].shape[1]) + job.config.max_new_tokens + len(suffix)
        ticket.copies = ClassifierFreeGuidance(job.config.cfg_scale).copies
        return True

    def _start(self, group: list[Ticket]) -> None:
        """Start `group` (equal settings) as one run, its prompts left-padded and its images encoded together; if
        that fails, halves are started, so only a request that fails alone gets the error."""
        model, tokenizer, job = self.model, self.processor.tokenizer, group[0].job
        try:
            inputs = collate_inputs([t.job.inputs for t in group], model.config.pad_token_id, model.device)
            config = copy.deepcopy(job.config)
            config.return_dict_in_generate = True
            generator = None
            if job.stochastic and job.seed is not None:  # (a seeded random request is a group of its own)
                generator = torch.Generator(device=model.device).manual_seed(job.seed)
            callback = None
            if any(t.job.sink is not None for t in group):
                stops, _ = model._stops_and_suffix(config, tokenizer)
                callback = StreamingCallback(tokenizer, config, [t.job for t in group], stops)
            run = model.start_denoising(
                **inputs, generation_config=config, generator=generator, tokenizer=tokenizer,
                step_callback=None if callback is None else self._timed(callback, group),
            )  # fmt: skip
        except Exception as err:  # noqa: BLE001 - split, so that only the failing request gets the error
            if len(group) == 1:
                self._answer(group[0], JobResult(error=err))
                return
            half = (len(group) + 1) // 2
            self._start(group[:half])
            self._start(group[half:])
            return
        for row, ticket in enumerate(group):
            ticket.run, ticket.row, ticket.callback = run, row, callback
            ticket.job.emit(StreamEvent("started", batch_size=len(self.running) + len(group)))
        self.running.extend(group)
        self.batch.add(run)

    def _timed(self, callback: StreamingCallback, group: list[Ticket]) -> Callable[[Any], None]:
        """`callback`, recording each request's time to its first streamed text."""

        def timed(step: Any) -> None:
            callback(step)
            now = time.perf_counter()
            for ticket in group:
                if ticket.job.streamed and not ticket.first_text:
                    ticket.first_text = True
                    self.metrics.observe("llada_v_time_to_first_token_seconds", now - ticket.submitted)

        return timed

    def _finish(self, ticket: Ticket) -> None:
        run = ticket.run
        try:
            ids = run.row_answer_ids(ticket.row)
            start = run.state.prompt_len + len(ids)
            following = run.state.canvas[ticket.row, start:].tolist()  # a stop string's ids, where it stopped there
            answer = decode_answer_at_stop(self.processor.tokenizer, ids, following, run.config.stop_strings)
            if ticket.callback is not None:
                ticket.callback.finish_row(ticket.row, answer.text)
            result = job_result(answer, len(ids), run.config, ticket.most_running)
        except Exception as err:  # noqa: BLE001 - this request's failure only
            result = JobResult(error=err)
        self.metrics.add("llada_v_answer_tokens_total", result.completion_tokens)
        self._answer(ticket, result)

    def _answer(self, ticket: Ticket, result: JobResult, cancelled: bool = False) -> None:
        if ticket in self.running:
            self.running.remove(ticket)
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


def collate_inputs(rows: list[dict], pad_token_id: int, device: torch.device) -> dict:
    """Single-prompt processor outputs as one batch, as the processor gives it for the prompts together: ids and
    attention masks left-padded, the image tensors (one entry per image or crop, in row order) concatenated."""
    if len(rows) == 1:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in rows[0].items()}
    width = max(int(r["input_ids"].shape[1]) for r in rows)
    batch: dict[str, Any] = {}
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = int(r["input_ids"].shape[1])
        ids[i, width - n :] = r["input_ids"][0]
        mask[i, width - n :] = r["attention_mask"][0] if "attention_mask" in r else 1
    batch["input_ids"], batch["attention_mask"] = ids, mask
    for key in sorted({k for r in rows for k in r} - {"input_ids", "attention_mask"}):
        parts = [r[key] for r in rows if key in r and r[key] is not None]
        if parts and all(isinstance(p, torch.Tensor) for p in parts):
            batch[key] = torch.cat(parts)
    return {k: v.to(device) for k, v in batch.items()}
