"""The OpenAI chat-completions wire format: the request parser and the JSON bodies this server sends.

`parse_chat_request` turns a request body into a `ChatRequest` (chat-template messages, image URLs in order,
sampler overrides) or raises `ApiError` naming the field and the value. It checks the shape of the request;
the sampler settings themselves are validated by `inference.generation_config_for` (one owner per rule).

Diffusion settings travel as extra body fields (`extra_body=` in the openai client): `steps`, `block_length`,
`remasking`, `cfg_scale`, `dllm_cache` (dLLM-Cache: an object of its settings, `{}` for the official defaults),
`fast` (the fast-decoding preset) and, with `stream`, `stream_canvas` (the answer canvas after every denoising
step as `llada.canvas` events).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
MAX_STOP_SEQUENCES = 4
# Fields accepted at their neutral value only (the sampler has no such setting).
NEUTRAL_VALUES = {"n": 1, "top_p": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
IGNORED_FIELDS = ("user",)
RESPONSE_FORMATS = ("text",)  # the answer is plain text; no JSON mode or schema
SETTINGS_FIELDS = ("steps", "block_length", "remasking", "cfg_scale", "dllm_cache")
KNOWN_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stop", "seed", "stream",
    "stream_options", "fast", "stream_canvas", "response_format", *SETTINGS_FIELDS, *NEUTRAL_VALUES, *IGNORED_FIELDS,
}  # fmt: skip


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass
class ChatRequest:
    """A parsed chat-completions request.

    Attributes:
        messages: chat-template messages (`{"type": "image"}` parts stand for the images, in order).
        image_urls: `(param, url)` per image, in the order of the prompt.
        overrides: sampler settings for `generation_config_for` (`max_new_tokens`, `temperature`, ...).
        fast: the fast-decoding preset (None: the server's default).
    """

    model: str
    messages: list[dict]
    image_urls: list[tuple[str, str]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    fast: bool | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    stream_canvas: bool = False


def parse_chat_request(
    body: Any, model_id: str, max_images: int, max_tokens_limit: int, max_prompt_chars: int | None = None
) -> ChatRequest:
    """Check a `/v1/chat/completions` body and return it parsed; `ApiError` names the first problem (400; 404
    for a model this server does not serve, as OpenAI answers)."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_fields(body)
    model = body.get("model")
    if model != model_id:
        raise ApiError(404, f"the model {_short(model)} does not exist; this server serves {model_id!r}", "model",
                       "model_not_found")  # fmt: skip
    messages, image_urls = _parse_messages(body.get("messages"))
    if len(image_urls) > max_images:
        raise invalid(f"too many images: {len(image_urls)} in the request, at most {max_images}", "messages")
    characters = prompt_characters(messages)
    if max_prompt_chars is not None and characters > max_prompt_chars:
        raise invalid(f"the messages hold {characters} characters of text, more than this server's limit of "
                      f"{max_prompt_chars}", "messages", "prompt_too_long")  # fmt: skip
    request = ChatRequest(model=model, messages=messages, image_urls=image_urls)
    request.overrides = _sampler_overrides(body, max_tokens_limit)
    request.fast = _optional_bool(body, "fast")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise invalid(f"seed must be an integer, got {seed!r}", "seed")
    request.seed = seed
    _parse_stream_fields(body, request)
    return request


def prompt_characters(messages: list[dict]) -> int:
    """The characters of every text in parsed `messages` (what the tokenizer would have to read)."""
    total = 0
    for message in messages:
        content = message["content"]
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
        total += sum(len(text) for text in parts)
    return total


def _check_fields(body: dict) -> None:
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise invalid(f"unsupported fields {unknown}; see docs/serving.md for what this server accepts", unknown[0])
    for name, neutral in NEUTRAL_VALUES.items():
        value = body.get(name)
        if value is not None and (value != neutral or isinstance(value, bool) != isinstance(neutral, bool)):
            raise invalid(f"{name}={value!r} is not supported (only {neutral!r})", name)
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in RESPONSE_FORMATS:
            shown = _short(kind) if kind is not None else _short(response_format)
            raise invalid(f"response_format type {shown} is not supported (only {', '.join(RESPONSE_FORMATS)!r}: "
                          "the answer is plain text)", "response_format")  # fmt: skip


def _parse_messages(messages: Any) -> tuple[list[dict], list[tuple[str, str]]]:
    if not isinstance(messages, list) or not messages:
        raise invalid(f"messages must be a non-empty list, got {_short(messages)}", "messages")
    parsed, image_urls = [], []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{param} must be an object, got {_short(message)}", param)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
        if role == "system" and index != 0:
            raise invalid(f"{param}: a system message must come first", f"{param}.role")
        content, urls = _parse_content(message.get("content"), f"{param}.content", allow_images=role == "user")
        parsed.append({"role": role, "content": content})
        image_urls.extend(urls)
    if parsed[-1]["role"] != "user":
        raise invalid(f"the last message must be a user message, got {parsed[-1]['role']!r}", "messages")
    return parsed, image_urls


def _parse_content(content: Any, param: str, allow_images: bool) -> tuple[Any, list[tuple[str, str]]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise invalid(f"{param} must be a string or a non-empty list of parts, got {_short(content)}", param)
    parts, urls = [], []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}.text must be a string, got {_short(part.get('text'))}", f"{where}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and allow_images:
            urls.append((f"{where}.image_url", _image_url(part.get("image_url"), f"{where}.image_url")))
            parts.append({"type": "image"})
        elif kind == "image_url":
            raise invalid(f"{where}: images are accepted in user messages only", where)
        else:
            raise invalid(f"{where} must be a text or image_url part, got {_short(part)}", where)
    return parts, urls


def _image_url(value: Any, param: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise invalid(f"{param} must be an object with a non-empty 'url' string, got {_short(value)}", param)
    return url


def _sampler_overrides(body: dict, max_tokens_limit: int) -> dict[str, Any]:
    max_tokens = body.get("max_tokens")
    alias = body.get("max_completion_tokens")
    if max_tokens is not None and alias is not None and max_tokens != alias:
        raise invalid(f"max_tokens ({max_tokens!r}) and max_completion_tokens ({alias!r}) differ", "max_tokens")
    max_tokens = alias if max_tokens is None else max_tokens
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise invalid(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        if max_tokens > max_tokens_limit:
            raise invalid(f"max_tokens ({max_tokens}) exceeds this server's limit ({max_tokens_limit})", "max_tokens")
    overrides = {"max_new_tokens": max_tokens, "temperature": body.get("temperature")}
    overrides.update({name: body.get(name) for name in SETTINGS_FIELDS})
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise invalid(f"stop must be a non-empty string or a list of 1-4 of them, got {_short(stop)}", "stop")
        overrides["stop_strings"] = stops
    return {name: value for name, value in overrides.items() if value is not None}


def _parse_stream_fields(body: dict, request: ChatRequest) -> None:
    request.stream = bool(_optional_bool(body, "stream"))
    options = body.get("stream_options")
    canvas = _optional_bool(body, "stream_canvas")
    if not request.stream and (options is not None or canvas):
        name = "stream_options" if options is not None else "stream_canvas"
        raise invalid(f"{name} needs stream: true", name)
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid(f"stream_options may hold only include_usage, got {_short(options)}", "stream_options")
        request.include_usage = bool(_optional_bool(options, "include_usage", "stream_options.include_usage"))
    request.stream_canvas = bool(canvas)


def _optional_bool(body: dict, name: str, param: str | None = None) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{param or name} must be true or false, got {value!r}", param or name)
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, text: str, finish_reason: str, token_usage: dict[str, int]
) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": token_usage,
    }


def chunk_body(
    request_id: str,
    model: str,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A `chat.completion.chunk`: one choice with `delta`, or (delta None) no choice, as for the usage chunk and
    the `llada.canvas` events; `extra` adds top-level fields (`usage`, `llada_canvas`)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    body["choices"] = choices
    body.update(extra)
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llada-v"}]}
