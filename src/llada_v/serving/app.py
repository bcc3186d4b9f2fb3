"""The Ray Serve application: the `LladaVServer` deployment, `app_builder` for `serve run` / `serve deploy`, and
`run_server` behind `llada-v serve`.

Each replica loads the model once and answers through `http_app.build_asgi_app`. With the step scheduler (the
default) chat requests go to the replica's `engine.StepEngine`, whose thread admits and retires requests at every
denoising step; with `scheduler="call"` they meet in `generate_batch` (`@serve.batch`: up to `max_batch_size`
requests, waiting at most `batch_wait_ms` for them), which runs `ChatService.run` on the replica's one generating
thread. Ray does the rest: replicas (a dead one is replaced), autoscaling, routing, several machines.

    serve run llada_v.serving.app:app_builder                      # the demo, Ray's own CLI
    serve deploy examples/serve_config.yaml                         # a running cluster
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from .batching import GenerationJob, JobResult
from .http_app import Admission, Slot, build_asgi_app
from .media import is_remote, read_image_url
from .openai_api import ChatRequest, invalid
from .options import ServeOptions, check_local_paths
from .service import ChatService

logger = logging.getLogger(__name__)
# Data and file URLs (base64, a file read, image headers: bounded work) and http(s) downloads (each cut off at its
# request's deadline) wait on separate threads, so no download holds up a request without one.
MEDIA_THREADS = 4
FETCH_THREADS = 16
# Beyond the download deadline, for the one step the loader cannot interrupt (name resolution).
FETCH_GRACE_S = 5.0


@serve.deployment(name="LladaVServer")
@serve.ingress()
class LladaVServer:
    """One model replica: the ASGI routes, admission control and the `@serve.batch` queue."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServeOptions.from_dict(options)
        self.service = ChatService(self.options)
        if self.service.model.device.type == "cpu" and self.options.num_cpus_per_replica >= 1:
            torch.set_num_threads(int(self.options.num_cpus_per_replica))  # the CPUs Ray reserved for this replica
        self.admission = Admission(self.options.replica_capacity, self.options.max_queued_pixels)
        # One thread generates (the model is not shared between batches); images are read on their own threads.
        self._generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llada-v-generate")
        self._media = ThreadPoolExecutor(max_workers=MEDIA_THREADS, thread_name_prefix="llada-v-media")
        self._fetch = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="llada-v-fetch")
        self.generate_batch.set_max_batch_size(self.options.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.options.batch_wait_ms / 1000)
        if self.service.engine is not None:
            self.service.engine.start()

    def __serve_build_asgi_app__(self) -> Any:
        return build_asgi_app(self)

    async def load_images(self, request: ChatRequest, slot: Slot) -> list[bytes]:
        """The request's encoded images, read off the event loop, their pixels checked from the headers and held on
        `slot` (400 over `max_request_pixels`, 503 over `max_queued_pixels`). http(s) downloads run on their own
        threads and end at the request's deadline (`image_fetch_timeout_s` from now)."""
        if not request.image_urls:
            return []
        loop = asyncio.get_running_loop()
        timeout = self.options.image_fetch_timeout_s
        deadline = time.monotonic() + timeout
        policy = self.service.media
        reads = [
            loop.run_in_executor(self._pool_for(url), read_image_url, url, param, policy, deadline)
            for param, url in request.image_urls
        ]
        try:
            results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), timeout + FETCH_GRACE_S)
        except asyncio.TimeoutError:
            raise invalid(f"loading the request's images took longer than {timeout} s", "messages") from None
        for result in results:
            if isinstance(result, BaseException):
                raise result
        pixels = await loop.run_in_executor(self._media, self.service.image_pixels, request, results)
        slot.reserve_pixels(pixels, self.service.retry_after_seconds(self.admission.active))
        return results

    def _pool_for(self, url: str) -> ThreadPoolExecutor:
        """Downloads on the fetch threads; data URLs and files on the media threads, never behind a download."""
        return self._fetch if is_remote(url) else self._media

    async def submit(self, job: GenerationJob) -> JobResult:
        """Answer `job` (step scheduler: the engine; call scheduler: the next batch); never raises for a failed
        generation (the result carries it). A request cancelled while it waits (its client went away) marks the
        job, and the step scheduler drops its row at the next step."""
        if self.service.engine is None:
            return await self._submit_call(job)
        loop = asyncio.get_running_loop()
        answered: asyncio.Future = loop.create_future()

        def done(result: JobResult) -> None:
            loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(result))

        self.service.engine.submit(job, done)
        try:
            return await answered
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def _submit_call(self, job: GenerationJob) -> JobResult:
        metrics, started = self.service.metrics, time.perf_counter()
        if job.sink is not None:
            job.sink = first_text_timer(job.sink, metrics, started)
        try:
            result = await self.generate_batch(job)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        except Exception as err:  # noqa: BLE001 - the batch machinery failed: this request gets a 500, not a hang
            return JobResult(error=err)
        metrics.add("llada_v_requests_total")
        metrics.add("llada_v_answer_tokens_total", result.completion_tokens)
        if result.error is None:
            metrics.observe("llada_v_request_seconds", time.perf_counter() - started)
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[JobResult]:
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._generator, self.service.run, jobs)
        logger.info(
            "batch of %d requests: generate calls of %s rows", len(jobs), sorted({r.batch_size for r in results})
        )
        return results


def first_text_timer(sink: Any, metrics: Any, started: float) -> Any:
    """`sink` that also records the time to the job's first text in `metrics` (the call scheduler's)."""
    seen = False

    def timed(event: Any) -> None:
        nonlocal seen
        if event.kind == "delta" and not seen:
            seen = True
            metrics.observe("llada_v_time_to_first_token_seconds", time.perf_counter() - started)
        sink(event)

    return timed


def build_app(options: ServeOptions) -> Any:
    """The bound Ray Serve application for `options`."""
    return LladaVServer.options(**options.deployment_options()).bind(options.to_dict())


def app_builder(args: dict[str, Any]) -> Any:
    """Entry point of `serve run llada_v.serving.app:app_builder key=value ...` and of the `import_path` of a Serve
    config file: `args` are `ServeOptions` fields (strings from the command line are converted)."""
    return build_app(ServeOptions.from_dict(dict(args), convert_strings=True))


# ---------------------------------------------------------------------------------------------- llada-v serve


def run_server(options: ServeOptions) -> int:
    """`llada-v serve`: start (or join) Ray, serve the application on `host:port`, stop cleanly on Ctrl-C/SIGTERM."""
    import ray

    for warning in options.security_warnings():
        print(f"llada-v serve: warning: {warning}", file=sys.stderr, flush=True)
    check_local_paths(options)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports leave the machine unless asked for
    stop = threading.Event()
    own_cluster = options.address is None
    if own_cluster:
        # The node agent's Prometheus export listens on every interface without authentication and Ray cannot
        # bind it to loopback; nothing here reads it (docs/serving.md, "Limits and security").
        os.environ.setdefault("RAY_enable_metrics_collection", "0")
    previous: dict = {}
    try:
        ray.init(address=options.address or "local", include_dashboard=False)
        # After ray.init, which installs its own handlers: Ctrl-C and SIGTERM both stop the server cleanly.
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(build_app(options), name=options.app_name, route_prefix="/", blocking=False)
        print(
            f"llada-v serve: {options.model_id} on http://{options.host}:{options.port}/v1 (Ctrl-C stops)", flush=True
        )
        while not stop.wait(0.5):
            pass
        print("llada-v serve: stopping", flush=True)
    finally:
        _shutdown(options.app_name, own_cluster)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _shutdown(app_name: str, own_cluster: bool) -> None:
    import ray

    if not ray.is_initialized():
        return
    try:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(app_name)  # leave the cluster and its other applications running
    finally:
        ray.shutdown()
