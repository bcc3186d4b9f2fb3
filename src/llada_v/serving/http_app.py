"""The ASGI application of a replica: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus text, `metrics.ServingMetrics`).

`build_asgi_app(server)` takes the replica (`app.LladaVServer`): its `service` (`service.ChatService`), its
`admission` and `submit(job)` (the `@serve.batch` entry). Every error is OpenAI-style JSON (`ApiError.body`):
400 for an invalid request, 401 without the API key (when one is set; `/health` needs none), 404 for an
unknown route or model, 413 for a body over `max_request_bytes`, 415 for a POST that is not
`Content-Type: application/json` (a cross-site form or `text/plain` post needs no CORS preflight, so a web page
could otherwise drive the server from a local browser), 503 with `Retry-After` when the replica already holds
`max_batch_size + max_queued_requests` chat requests, 500 when generation itself failed. A client that goes away
(closes the connection) marks its job cancelled: the step scheduler drops its row before the next denoising step.

A streamed answer (`stream: true`) is sent as server-sent events once its first text (or canvas) exists, so a
request the sampler rejects still gets a plain 400. The header `x-llada-batch-size` says how many rows the
`diffusion_generate` call that produced the answer had (step scheduler: the most requests running together while
it was denoised).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import JobResult, StreamEvent, next_event
from .openai_api import ApiError, chunk_body, completion_body, completion_id, invalid, models_body, usage

BATCH_SIZE_HEADER = "x-llada-batch-size"
JSON_MEDIA_TYPE = "application/json"
PROMETHEUS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"
logger = logging.getLogger(__name__)


class Admission:
    """Counts the chat requests a replica holds and the pixels of their images; refuses more than `capacity`
    requests or `pixel_capacity` pixels with 503 + Retry-After."""

    def __init__(self, capacity: int, pixel_capacity: int | None = None) -> None:
        self.capacity = capacity
        self.active = 0
        self.pixel_capacity = pixel_capacity
        self.pixels = 0

    def enter(self, retry_after: int) -> Slot:
        if self.active >= self.capacity:
            raise ApiError(
                503,
                f"server busy: this replica holds {self.active} requests (limit {self.capacity}); retry later",
                code="queue_full",
                headers={"Retry-After": str(retry_after)},
            )
        self.active += 1
        return Slot(self)


class Slot:
    """One admitted request; `release` (idempotent) gives the place back."""

    def __init__(self, admission: Admission) -> None:
        self.admission: Admission | None = admission
        self.pixels = 0

    def reserve_pixels(self, pixels: int, retry_after: int) -> None:
        """Hold `pixels` of images until `release`; 503 when the replica's requests would hold more than its limit."""
        admission = self.admission
        if admission is None or admission.pixel_capacity is None:
            return
        if admission.pixels + pixels > admission.pixel_capacity:
            raise ApiError(
                503,
                f"server busy: this replica's requests hold {admission.pixels} pixels of images and this one needs "
                f"{pixels} (limit {admission.pixel_capacity}); retry later",
                code="queue_full",
                headers={"Retry-After": str(retry_after)},
            )
        admission.pixels += pixels
        self.pixels += pixels

    def release(self, *_: Any) -> None:
        if self.admission is not None:
            self.admission.active -= 1
            self.admission.pixels -= self.pixels
            self.admission = None


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def result_error(result: JobResult) -> ApiError:
    """A failed job as an API error: the sampler or processor rejecting this request alone is a 400."""
    err = result.error
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ValueError):
        return invalid(f"the request cannot be generated: {err}", code="invalid_request")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="generation_failed")


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (OpenAI's convention); no key: open."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        what = "no API key given" if not given else "incorrect API key"
        raise ApiError(401, f"{what}: send the server's key as 'Authorization: Bearer KEY'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def check_json_content_type(request: Request) -> None:
    """415 unless the body is declared as JSON: browsers send cross-site `text/plain` and form posts without
    asking the server first (no CORS preflight), `application/json` only after a preflight this server refuses."""
    declared = request.headers.get("content-type", "")
    if declared.split(";", 1)[0].strip().lower() != JSON_MEDIA_TYPE:
        raise ApiError(415, f"Content-Type must be {JSON_MEDIA_TYPE}, got {declared or 'none'!r}",
                       code="unsupported_media_type")  # fmt: skip


async def read_json(request: Request, max_bytes: int) -> Any:
    """The JSON body, refusing more than `max_bytes` (413) before reading it where Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes",
                       code="request_too_large")  # fmt: skip
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > max_bytes:
            raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes", code="request_too_large")
    try:
        return json.loads(received)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid(f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise invalid("the request body is nested too deeply to be a chat request") from None


def build_asgi_app(server: Any) -> Starlette:
    """The replica's routes, bound to `server` (no module-level state)."""

    async def chat_completions(request: Request) -> Response:
        try:
            check_api_key(request, server.service.options.api_key)
            check_json_content_type(request)
            return await _chat(server, request)
        except ApiError as err:
            return error_response(err)

    async def models(request: Request) -> Response:
        service = server.service
        try:
            check_api_key(request, service.options.api_key)
        except ApiError as err:
            return error_response(err)
        return JSONResponse(models_body(service.options.model_id, service.created))

    async def health(request: Request) -> Response:
        body = {"status": "ok", **server.service.health(), "active_requests": server.admission.active,
                "capacity": server.admission.capacity, "queued_pixels": server.admission.pixels}  # fmt: skip
        return JSONResponse(body)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(server.service.metrics.render(), media_type=PROMETHEUS_MEDIA_TYPE)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    if server.options.web:  # `llada-v serve --web`: the web page at `/`, behind the routes above (docs/web.md)
        from ..web.app import mount_replica_page

        mount_replica_page(app, server)
    return app


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (unknown route 404, wrong method 405) in the OpenAI error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug, not the client's fault: still JSON, and logged with its traceback."""
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))


async def _chat(server: Any, request: Request) -> Response:
    service = server.service
    body = await read_json(request, service.options.max_request_bytes)
    parsed = service.parse(body)
    config = service.settings(parsed)
    slot = server.admission.enter(service.retry_after_seconds(server.admission.active))
    task = None
    try:
        images = await server.load_images(parsed, slot)
        job, prompt_tokens = await asyncio.to_thread(service.build_job, parsed, config, images)
        request_id = completion_id()
        if parsed.stream:
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            job.sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
        task = asyncio.ensure_future(server.submit(job))
        task.add_done_callback(slot.release)  # the place is free once the answer is generated
        if parsed.stream:
            return await _stream(queue, task, parsed, request_id, prompt_tokens, job)
        try:
            result: JobResult = await task
        except asyncio.CancelledError:  # the client went away: its row leaves at the next step
            job.cancelled = True
            raise
        if result.error is not None:
            return error_response(result_error(result))
        body = completion_body(request_id, parsed.model, result.text, result.finish_reason,
                               usage(prompt_tokens, result.completion_tokens))  # fmt: skip
        return JSONResponse(body, headers={BATCH_SIZE_HEADER: str(result.batch_size)})
    finally:
        if task is None:
            slot.release()


async def _stream(queue: asyncio.Queue, task: asyncio.Future, parsed: Any, request_id: str,
                  prompt_tokens: int, job: Any) -> Response:  # fmt: skip
    batch_size, first = 0, None
    while first is None:  # wait for the first text or canvas: errors before it are plain responses
        try:
            event = await next_event(queue, task)
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if event is None:
            break
        if event.kind == "started":
            batch_size = event.batch_size
        else:
            first = event
    if first is None:
        result: JobResult = task.result()
        if result.error is not None:
            return error_response(result_error(result))
        batch_size = result.batch_size
    events = _sse(queue, task, first, parsed, request_id, prompt_tokens, job)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={BATCH_SIZE_HEADER: str(batch_size), "Cache-Control": "no-cache"})  # fmt: skip


def _data(body: dict, event: str | None = None) -> str:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(body)}\n\n"


async def _sse(queue: asyncio.Queue, task: asyncio.Future, first: StreamEvent | None, parsed: Any,
               request_id: str, prompt_tokens: int, job: Any) -> AsyncIterator[str]:  # fmt: skip
    """The event stream: role, text deltas (and `llada.canvas` events), the finish reason, usage, `[DONE]`.
    A client that disconnects before the end closes this generator: the job is marked cancelled."""
    try:
        async for text in _sse_events(queue, task, first, parsed, request_id, prompt_tokens):
            yield text
    finally:
        if not task.done():
            job.cancelled = True


async def _sse_events(queue: asyncio.Queue, task: asyncio.Future, first: StreamEvent | None, parsed: Any,
                      request_id: str, prompt_tokens: int) -> AsyncIterator[str]:  # fmt: skip
    model = parsed.model
    yield _data(chunk_body(request_id, model, {"role": "assistant", "content": ""}))
    event = first
    while event is not None:
        if event.kind == "delta":
            yield _data(chunk_body(request_id, model, {"content": event.text}))
        elif event.kind == "canvas":
            yield _data(chunk_body(request_id, model, llada_canvas=event.canvas), event="llada.canvas")
        event = await next_event(queue, task)
    result: JobResult = task.result()
    if result.error is not None:
        yield _data(result_error(result).body())
    else:
        yield _data(chunk_body(request_id, model, {}, finish_reason=result.finish_reason))
        if parsed.include_usage:
            yield _data(chunk_body(request_id, model, usage=usage(prompt_tokens, result.completion_tokens)))
    yield "data: [DONE]\n\n"
