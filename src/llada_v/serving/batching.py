"""Requests as generation jobs: settings groups, one `generate_texts` call per group, streaming of committed text.

A replica's `@serve.batch` method hands `run_batch` the jobs that arrived together. Jobs whose sampler settings
are equal form a group and run as one left-padded `diffusion_generate` batch; at temperature 0 a row's answer
equals its single-request answer (docs/generation.md). A job whose randomness is seeded runs alone, so that the
same request with the same seed gets the same answer whatever else is being served.

If a group fails (e.g. one prompt does not fit the model's context; the sampler says so before any forward
pass), it is split in halves and retried, so only the rows that fail by themselves get the error. A job that has
already streamed text is not retried: it gets the error.

Streaming: blocks are denoised left to right and a committed token never changes, so the answer's prefix up to
its first mask (cut at a found stop) is final. `StreamingCallback` decodes that prefix after every step and sends
each job the new text (and, on request, the whole answer canvas).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..inference import cut_at_stop_strings, generate_answers, stop_string_prefix_length

logger = logging.getLogger(__name__)


@dataclass
class StreamEvent:
    """What a job's sink receives: `started` (with `batch_size`), `delta` (with `text`), `canvas` (with `canvas`)."""

    kind: str
    batch_size: int = 0
    text: str = ""
    canvas: dict | None = None


@dataclass
class GenerationJob:
    """One request's prompt, images and sampler settings. `sink` (called from the generating thread) gets its
    `StreamEvent`s; None for a request that waits for the whole answer."""

    text: str
    images: list
    config: Any  # LladaVGenerationConfig
    seed: int | None = None
    sink: Callable[[StreamEvent], None] | None = None
    stream_canvas: bool = False
    streamed: bool = False  # text went out: a failed group is not retried for this job
    inputs: dict | None = None  # the processor's outputs for this prompt alone (the step scheduler reuses them)
    cancelled: bool = False  # the client went away (the step scheduler drops the row at its next step)

    def emit(self, event: StreamEvent) -> None:
        if self.sink is not None:
            self.sink(event)

    @property
    def stochastic(self) -> bool:
        return self.config.temperature > 0 or self.config.remasking == "random"


@dataclass
class JobResult:
    """The answer (`text`, `completion_tokens`, `finish_reason` "stop"/"length"), the rows of the
    `diffusion_generate` call it came from (`batch_size`), or the `error` that ended it."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "stop"
    batch_size: int = 0
    error: Exception | None = None


def settings_key(job: GenerationJob) -> str:
    """Jobs with equal keys can share a `diffusion_generate` call."""
    key = json.dumps(job.config.to_dict(), sort_keys=True, default=str)
    if job.stochastic and job.seed is not None:
        key += f"|alone:{id(job)}"  # a seeded random job is reproducible only in a batch of its own
    return key


def group_jobs(jobs: list[GenerationJob]) -> list[list[int]]:
    """Indices of `jobs` grouped by `settings_key`, groups and members in arrival order."""
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(settings_key(job), []).append(index)
    return list(groups.values())


def run_batch(model: Any, processor: Any, jobs: list[GenerationJob], metrics: Any = None) -> list[JobResult]:
    """Run every job (one `generate_texts` call per settings group); never raises for a job's failure.
    `metrics` (`metrics.ServingMetrics`) counts the calls' forward passes and rows."""
    results: list[JobResult | None] = [None] * len(jobs)
    for indices in group_jobs(jobs):
        _run_split(model, processor, jobs, indices, results, metrics)
    return [result if result is not None else JobResult(error=RuntimeError("job was not run")) for result in results]


def _run_split(model: Any, processor: Any, jobs: list, indices: list[int], results: list, metrics: Any) -> None:
    try:
        outcome = run_group(model, processor, [jobs[i] for i in indices], metrics)
    except Exception as err:  # noqa: BLE001 - a failing request must not end the replica or its batch mates
        logger.warning("a batch of %d rows failed (%s: %s)", len(indices), type(err).__name__, err)
        retry = []
        for i in indices:
            if jobs[i].streamed or len(indices) == 1:
                results[i] = JobResult(error=err)
            else:
                retry.append(i)
        half = (len(retry) + 1) // 2
        for part in (retry[:half], retry[half:]):
            if part:
                _run_split(model, processor, jobs, part, results, metrics)
        return
    for i, result in zip(indices, outcome):
        results[i] = result


def run_group(model: Any, processor: Any, jobs: list[GenerationJob], metrics: Any = None) -> list[JobResult]:
    """One `generate_texts` call for jobs with equal settings (left-padded batch)."""
    config = jobs[0].config
    seed = jobs[0].seed if jobs[0].stochastic else None
    for job in jobs:
        job.emit(StreamEvent("started", batch_size=len(jobs)))
    callback = None
    if any(job.sink is not None for job in jobs):
        stops, _ = model._stops_and_suffix(config, processor.tokenizer)  # the sampler's own stop sequences
        callback = StreamingCallback(processor.tokenizer, config, jobs, stops)
    answers, output = generate_answers(
        model, processor, [job.text for job in jobs], [job.images for job in jobs], config,
        step_callback=callback, seed=seed,
    )  # fmt: skip
    if callback is not None:
        callback.finish([answer.text for answer in answers])
    if metrics is not None:
        metrics.add("llada_v_forward_passes_total", output.num_forward_passes)
        metrics.add("llada_v_forward_rows_total", int(output.forward_passes_per_row.sum()))
    lengths = output.answer_lengths.tolist()
    return [job_result(answer, length, config, len(jobs)) for answer, length in zip(answers, lengths)]


def job_result(answer: Any, answer_length: int, config: Any, batch_size: int) -> JobResult:
    """The result of a decoded answer (`inference.Answer`) of `answer_length` tokens before its stop: "stop" when a
    stop string cut it or it ended before the canvas did, else "length"."""
    stopped = answer.stop_string is not None or answer_length < config.max_new_tokens
    return JobResult(text=answer.text, completion_tokens=answer.num_tokens,
                     finish_reason="stop" if stopped else "length", batch_size=batch_size)  # fmt: skip


# ---------------------------------------------------------------------------------------------- streaming


class CommittedText:
    """The final part of one row's answer text, growing as the sampler commits tokens.

    `update` returns the text that became final since the last call: the answer's ids up to the first mask (cut at
    the stop once one is found before it), minus the last `holdback` ids while no stop is found (they could be the
    start of a multi-token stop sequence), decoded like `generate_texts` decodes answers (special tokens skipped,
    stripped, cut before the first of `stop_strings`; while the text can still grow, an end that could be the
    start of a stop string waits). Text is held back while it ends in an incomplete character or would change
    what was sent, so nothing after a stop string is ever sent.
    """

    def __init__(
        self, tokenizer: Any, mask_token_id: int, holdback: int = 0, stop_strings: list[str] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.holdback = holdback
        self.stop_strings = stop_strings
        self.sent = ""

    def update(self, answer_ids: list[int], stop: int | None) -> str:
        committed = len(answer_ids)
        if self.mask_token_id in answer_ids:
            committed = answer_ids.index(self.mask_token_id)
        complete = stop is not None and stop <= committed
        final = answer_ids[:stop] if complete else answer_ids[: max(0, committed - self.holdback)]
        decoded = self.tokenizer.decode(final, skip_special_tokens=True).strip()
        text, found = cut_at_stop_strings(decoded, self.stop_strings)
        if found is None and not complete:
            text = text[: len(text) - stop_string_prefix_length(text, self.stop_strings)].rstrip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, answer: str) -> str:
        """The rest of the final `answer` (what `generate_texts` returned)."""
        if not answer.startswith(self.sent):
            logger.warning("streamed text %r is not a prefix of the answer %r", self.sent, answer)
            return ""
        delta, self.sent = answer[len(self.sent) :], answer
        return delta


class StreamingCallback:
    """`step_callback` for a group: committed-text deltas (and optionally the canvas) to each job's sink."""

    def __init__(self, tokenizer: Any, config: Any, jobs: list[GenerationJob], stops: list[list[int]]) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.jobs = jobs
        holdback = max((len(s) for s in stops), default=1) - 1
        self.texts = [CommittedText(tokenizer, config.mask_token_id, holdback, config.stop_strings) for _ in jobs]

    def __call__(self, step: Any) -> None:
        start, length = step.prompt_length, self.config.max_new_tokens
        active = set(step.rows.tolist())
        for row, job in enumerate(self.jobs):
            if job.sink is None:
                continue
            answer = step.canvas[row, start : start + length].tolist()
            stop = step.stop_indices[row]
            if job.stream_canvas and row in active:  # a finished row's canvas no longer changes
                job.emit(StreamEvent("canvas", canvas=self.canvas(step, answer, stop)))
            delta = self.texts[row].update(answer, stop)
            if delta:
                job.streamed = True
                job.emit(StreamEvent("delta", text=delta))

    def canvas(self, step: Any, answer: list[int], stop: int | None) -> dict:
        mask = self.config.mask_token_id
        return {
            "step": step.step,
            "block": step.block,
            "ids": [None if t == mask else t for t in answer],
            "tokens": [None if t == mask else self.tokenizer.decode([t]) for t in answer],
            "stop": stop,
        }

    def finish(self, answers: list[str]) -> None:
        for row, answer in enumerate(answers):
            self.finish_row(row, answer)

    def finish_row(self, row: int, answer: str) -> None:
        """The rest of row `row`'s final `answer` to its job."""
        job = self.jobs[row]
        delta = self.texts[row].finish(answer)
        if job.sink is not None and delta:
            job.streamed = True
            job.emit(StreamEvent("delta", text=delta))


async def next_event(queue: asyncio.Queue, task: asyncio.Future) -> StreamEvent | None:
    """The job's next event from `queue`, or None once `task` (its batch call) has finished and every event was
    read: the one reader of a job's events (the HTTP routes and the web page)."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None if queue.empty() else queue.get_nowait()
