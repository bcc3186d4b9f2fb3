"""What a replica holds and does, without Ray: the model, a request body -> a `GenerationJob`, jobs -> answers (the
step scheduler `engine.StepEngine`, or for the call scheduler a list of jobs -> `batching.run_batch`), and the
counters `/health` and `/metrics` show.

The checkpoint loads through `inference.load_pretrained` (its checks, one-line `InputError`s), sampler settings
through `inference.generation_config_for`, prompts through `inference.chat_prompt`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..generation_utils import check_canvas_length
from ..inference import (
    InputError,
    chat_prompt,
    generation_config_for,
    load_pretrained,
    prepare_inputs,
)
from .batching import GenerationJob, JobResult, run_batch
from .engine import StepEngine
from .media import MediaPolicy, check_request_pixels, header_pixels, read_image_url
from .metrics import ServingMetrics
from .openai_api import ChatRequest, invalid, parse_chat_request
from .options import ServeOptions


def load_model(options: ServeOptions) -> tuple[Any, Any]:
    """The model (with `options.adapter` applied) and processor a replica serves."""
    return load_pretrained(
        options.model_path, options.processor, dtype=options.dtype, device=options.device,
        quantization=options.quantization, attn_implementation=options.attn_implementation, adapter=options.adapter,
    )  # fmt: skip


@dataclass
class ServiceStats:
    """Counters of one replica (shown by `/health`). With the step scheduler `/health` shows the engine's: requests
    answered, steps (`batches`), the most requests running together, the time spent in steps."""

    requests: int = 0
    batches: int = 0  # calls of the @serve.batch method
    largest_batch: int = 0  # rows of the largest diffusion_generate call
    last_batch_seconds: float = 0.0
    generate_seconds: float = 0.0  # in run_batch, summed over batches


class ChatService:
    """A loaded checkpoint answering chat requests; `run` is called from one generating thread at a time."""

    def __init__(self, options: ServeOptions, model: Any = None, processor: Any = None) -> None:
        self.options = options
        if model is None:
            model, processor = load_model(options)
        self.model, self.processor = model, processor
        # The processor's decompression-bomb limit applies to images from requests too.
        self.media = MediaPolicy.from_options(options, getattr(processor.image_processor, "max_image_pixels", None))
        self.base_config = generation_config_for(model.generation_config, {}, fast=options.fast)
        self.created = int(time.time())
        self.stats = ServiceStats()
        self._lock = threading.Lock()
        self.metrics = ServingMetrics(options.scheduler)
        self.engine: StepEngine | None = None  # the step scheduler (started by the replica)
        if options.scheduler == "step":
            self.engine = StepEngine(model, processor, options.max_batch_tokens, options.max_batch_size, self.metrics)

    # ------------------------------------------------------------------ a request -> a job

    def parse(self, body: Any) -> ChatRequest:
        return parse_chat_request(
            body, self.options.model_id, self.options.max_images_per_request, self.options.max_tokens_limit,
            self.options.max_prompt_chars,
        )  # fmt: skip

    def settings(self, request: ChatRequest) -> Any:
        """The request's sampler settings, or `ApiError` 400 with the validation message."""
        fast = self.options.fast if request.fast is None else request.fast
        try:
            return generation_config_for(self.model.generation_config, request.overrides, fast=fast)
        except InputError as err:
            raise invalid(f"invalid generation settings: {err}", code="invalid_settings") from None

    def load_images(self, request: ChatRequest) -> list:
        """The request's encoded images (blocking: URL fetches), or `ApiError` 400 naming the part."""
        return [read_image_url(url, param, self.media) for param, url in request.image_urls]

    def image_pixels(self, request: ChatRequest, images: list[bytes]) -> int:
        """The pixels the request's images will cost the image processor, from their headers; `ApiError` 400 for
        an image over the processor's limit or a request over `max_request_pixels`."""
        params = [param for param, _ in request.image_urls]
        urls = [url for _, url in request.image_urls]
        pixels = header_pixels(images, params, urls, self.processor.image_processor)
        check_request_pixels(pixels, params, self.options.max_request_pixels)
        return sum(pixels)

    def build_job(self, request: ChatRequest, config: Any, images: list) -> tuple[GenerationJob, int]:
        """The job and its prompt's token count (the processor runs once on this request alone to count it).
        A prompt that cannot fit the model's context with the answer canvas is refused here, on the request's
        own thread, before it is queued (`generation_utils.check_canvas_length`, the sampler's own check)."""
        text = chat_prompt(self.processor, request.messages, system_prompt=self.options.default_system_prompt)
        try:
            inputs = prepare_inputs(self.processor, [text], [images], torch.device("cpu"))
            _, suffix = self.model._stops_and_suffix(config, self.processor.tokenizer)
        except (ValueError, TypeError) as err:
            raise invalid(f"cannot process the prompt and images: {err}", "messages") from None
        try:
            check_canvas_length(int(inputs["input_ids"].shape[1]), config.max_new_tokens, len(suffix),
                                self.model.config.get_text_config().max_position_embeddings)  # fmt: skip
        except ValueError as err:
            raise invalid(f"the request cannot be generated: {err}", "messages", "prompt_too_long") from None
        job = GenerationJob(
            text=text, images=images, config=config, seed=request.seed, stream_canvas=request.stream_canvas,
            inputs=inputs if self.engine is not None else None,  # the step scheduler starts from them
        )  # fmt: skip
        return job, int(inputs["input_ids"].shape[1])

    # ------------------------------------------------------------------ jobs -> answers

    def run(self, jobs: list[GenerationJob]) -> list[JobResult]:
        """Answer a batch of jobs (one `diffusion_generate` call per settings group) and count it."""
        started = time.perf_counter()
        self.metrics.set("llada_v_running_requests", len(jobs))
        with torch.inference_mode():
            results = run_batch(self.model, self.processor, jobs, self.metrics)
        self.metrics.observe("llada_v_step_seconds", time.perf_counter() - started)
        self.metrics.set("llada_v_running_requests", 0)
        with self._lock:
            self.stats.requests += len(jobs)
            self.stats.batches += 1
            self.stats.largest_batch = max([self.stats.largest_batch, *(r.batch_size for r in results)])
            self.stats.last_batch_seconds = time.perf_counter() - started
            self.stats.generate_seconds += self.stats.last_batch_seconds
        return results

    def retry_after_seconds(self, active: int) -> int:
        """Seconds a refused client should wait: the batches needed for the `active` requests ahead of it
        (`max_batch_size` rows each) times the average batch duration so far (the last one before any; with the
        step scheduler the average time a request took), at least 1."""
        if self.engine is not None:
            batches, seconds = self.engine.finished, self.engine.finished_seconds
        else:
            with self._lock:
                batches, seconds = self.stats.batches, self.stats.generate_seconds
        per_batch = seconds / batches if batches else self.stats.last_batch_seconds
        ahead = math.ceil(max(active, 1) / self.options.max_batch_size)
        return max(1, math.ceil(ahead * per_batch))

    def health(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(vars(self.stats))
        engine = self.engine
        if engine is not None:  # the step scheduler: a "batch" is one step of the running batch
            stats.update(requests=engine.finished, batches=engine.steps, largest_batch=engine.largest_batch,
                         generate_seconds=engine.step_seconds, answered_seconds=engine.finished_seconds)  # fmt: skip
        metrics = self.metrics.snapshot()
        counters = {
            "forward_passes": int(metrics["llada_v_forward_passes_total"]),
            "forward_rows": int(metrics["llada_v_forward_rows_total"]),
            "running_requests": int(metrics["llada_v_running_requests"]),
            "waiting_requests": int(metrics["llada_v_waiting_requests"]),
            "admission_seconds": metrics["llada_v_admission_seconds_total"],
            "pass_seconds": metrics["llada_v_pass_seconds_total"],
        }
        return {"model": self.options.model_id, "scheduler": self.options.scheduler, **stats, **counters}
