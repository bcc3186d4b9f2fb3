"""`ServeOptions`: every setting of the server in one validated dataclass, built from the `llada-v serve`
arguments (`command.options_from_args`) or from the `args:` of a Ray Serve config file (`ServeOptions.from_dict`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint_io import DTYPES
from ..inference import InputError

DEMO_MODEL_NAME = "llada-v-demo"
API_KEY_ENV = "LLADA_V_API_KEY"  # the API key when none is given (keeps it out of the process list)
DTYPE_CHOICES = ("auto", *DTYPES)
QUANTIZATION_CHOICES = (None, "4bit", "8bit")
SCHEDULERS = ("step", "call")
INT_OPTIONS = {
    "port", "num_replicas", "min_replicas", "max_replicas", "max_batch_size", "max_queued_requests",
    "max_request_bytes", "max_images_per_request", "max_image_bytes", "max_tokens_limit", "max_prompt_chars",
    "max_request_pixels", "max_queued_pixels", "max_batch_tokens",
}  # fmt: skip
FLOAT_OPTIONS = {"target_ongoing_requests", "num_cpus_per_replica", "num_gpus_per_replica", "batch_wait_ms",
                 "image_fetch_timeout_s"}  # fmt: skip
BOOL_OPTIONS = {"fast", "remote_images", "web"}
# Requests other than chat completions (health, model list) that a full replica must still take.
CONTROL_SLOTS = 8


@dataclass
class ServeOptions:
    """Settings of `llada-v serve` and of the Ray Serve application (docs/serving.md, "Options").

    Model: `model` (None: the embedded demo), `processor`, `adapter` (a PEFT LoRA folder), `dtype`,
    `quantization` ("4bit"/"8bit"), `device`, `attn_implementation`, `fast` (the fast-decoding preset by default),
    `system_prompt` (None: "" for the demo, which was trained without one; the template's default otherwise),
    `served_model_name` (the `model` id clients send; default `llada-v-demo` or `model`).

    Server: `host`, `port`, `address` (a Ray cluster to join; None starts a local one), `app_name`,
    `num_replicas` or autoscaling bounds `min_replicas`/`max_replicas` with `target_ongoing_requests`,
    `num_cpus_per_replica` (also the replica's torch threads on CPU), `num_gpus_per_replica`, `web` (the web page,
    docs/web.md, at `/` of every replica; needs the `web` extra).

    Batching and limits: `scheduler` ("step": continuous batching, requests join and leave the running batch at
    every denoising step, `llada_v.serving.engine`; "call": `@serve.batch` groups run whole `diffusion_generate`
    calls), `max_batch_tokens` (step: the canvas tokens of the running batch), `max_batch_size` (requests in the
    running batch / rows per call), `batch_wait_ms` (call: how long a batch waits to fill), `max_queued_requests` (per replica, beyond the rows
    being generated; more gets 503), `max_request_bytes` (413 above), `max_images_per_request`,
    `max_image_bytes` (per image: a data URL's decoded size, a download, a local file), `image_fetch_timeout_s`
    (all of a request's http(s) downloads), `remote_images` (http(s) URLs),
    `allowed_local_media_path` (file:// URLs only under it), `max_tokens_limit` (the largest `max_tokens`),
    `max_request_pixels` (the pixels one request's images may cost the image processor, read from their headers
    before decoding; more gets 400), `max_queued_pixels` (the same, summed over the requests a replica holds;
    more gets 503 + Retry-After),
    `max_prompt_chars` (the characters of all message texts together, refused before tokenising).

    Security: `api_key` (clients send `Authorization: Bearer KEY`; None: read `LLADA_V_API_KEY`, unset: no key).
    """

    model: str | None = None
    processor: str | None = None
    adapter: str | None = None
    dtype: str = "auto"
    quantization: str | None = None
    device: str = "auto"
    attn_implementation: str | None = None
    fast: bool = False
    system_prompt: str | None = None
    served_model_name: str | None = None

    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    app_name: str = "llada-v"
    num_replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    web: bool = False

    scheduler: str = "step"
    max_batch_tokens: int = 16384
    max_batch_size: int = 16
    batch_wait_ms: float = 20.0
    max_queued_requests: int = 64
    max_request_bytes: int = 20 * 2**20
    max_images_per_request: int = 8
    max_image_bytes: int = 10 * 2**20
    image_fetch_timeout_s: float = 10.0
    remote_images: bool = True
    allowed_local_media_path: str | None = None
    max_tokens_limit: int = 1024
    max_prompt_chars: int = 256 * 1024
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never in logs
    max_request_pixels: int = 50_000_000
    max_queued_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise `InputError` naming the first invalid setting."""
        _positive_int("port", self.port, maximum=65535)
        if self.scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        _positive_int("max_batch_tokens", self.max_batch_tokens)
        _positive_int("max_batch_size", self.max_batch_size)
        _non_negative("batch_wait_ms", self.batch_wait_ms)
        _non_negative_int("max_queued_requests", self.max_queued_requests)
        _positive_int("max_request_bytes", self.max_request_bytes)
        _non_negative_int("max_images_per_request", self.max_images_per_request)
        _positive_int("max_image_bytes", self.max_image_bytes)
        _positive_int("max_tokens_limit", self.max_tokens_limit)
        _positive_int("max_prompt_chars", self.max_prompt_chars)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise InputError(f"api_key must be a non-empty string, got {self.api_key!r}")
        _positive_int("max_request_pixels", self.max_request_pixels)
        _positive_int("max_queued_pixels", self.max_queued_pixels)
        if self.max_queued_pixels < self.max_request_pixels:
            raise InputError(
                f"max_queued_pixels ({self.max_queued_pixels}) must be >= max_request_pixels "
                f"({self.max_request_pixels})"
            )
        _non_negative("num_cpus_per_replica", self.num_cpus_per_replica)
        _non_negative("num_gpus_per_replica", self.num_gpus_per_replica)
        if not isinstance(self.image_fetch_timeout_s, (int, float)) or self.image_fetch_timeout_s <= 0:
            raise InputError(f"image_fetch_timeout_s must be a number > 0, got {self.image_fetch_timeout_s!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise InputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise InputError(f"quantization must be None, '4bit' or '8bit', got {self.quantization!r}")
        if not self.host or not isinstance(self.host, str):
            raise InputError(f"host must be a non-empty string, got {self.host!r}")
        self._validate_replicas()

    def _validate_replicas(self) -> None:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and self.num_replicas is not None:
            raise InputError(
                f"give num_replicas ({self.num_replicas}) or autoscaling bounds (min_replicas {self.min_replicas}, "
                f"max_replicas {self.max_replicas}), not both"
            )
        if self.num_replicas is not None:
            _positive_int("num_replicas", self.num_replicas)
        if autoscaling:
            low = 1 if self.min_replicas is None else self.min_replicas
            high = max(low, 1) if self.max_replicas is None else self.max_replicas
            _non_negative_int("min_replicas", low)
            _positive_int("max_replicas", high)
            if high < low:
                raise InputError(f"max_replicas ({high}) must be >= min_replicas ({low})")
        if self.target_ongoing_requests is not None and (
            not isinstance(self.target_ongoing_requests, (int, float)) or self.target_ongoing_requests <= 0
        ):
            raise InputError(f"target_ongoing_requests must be a number > 0, got {self.target_ongoing_requests!r}")

    # ------------------------------------------------------------------ derived settings

    @property
    def model_path(self) -> str:
        """The checkpoint to load: `model`, or the embedded demo checkpoint."""
        if self.model is not None:
            return self.model
        from ..demo.model import demo_model_dir

        return str(demo_model_dir())

    @property
    def model_id(self) -> str:
        """The id clients send as `model` and `/v1/models` lists."""
        if self.served_model_name:
            return self.served_model_name
        return DEMO_MODEL_NAME if self.model is None else self.model

    @property
    def default_system_prompt(self) -> str | None:
        """`system_prompt`, or "" for the demo (trained without one), or None (the template's default)."""
        if self.system_prompt is not None:
            return self.system_prompt
        return "" if self.model is None else None

    @property
    def replica_capacity(self) -> int:
        """Chat requests a replica holds at once: a batch being generated plus the queue."""
        return self.max_batch_size + self.max_queued_requests

    @property
    def loopback_only(self) -> bool:
        """Whether `host` accepts connections from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: assume other machines can reach it
            return False

    def security_warnings(self) -> list[str]:
        """What an operator should know before these settings face a network (printed by `llada-v serve`)."""
        if self.loopback_only:
            return []
        warnings = []
        if not self.api_key:
            warnings.append(
                f"--host {self.host} accepts connections from other machines and no API key is set: anyone who can "
                f"reach port {self.port} can generate and make the server fetch image URLs; set --api-key (or "
                f"{API_KEY_ENV}) or put an authenticating proxy in front"
            )
        if self.web:
            warnings.append(
                f"--web: the page at / on port {self.port} is not behind the API key; anyone who can reach it can "
                "generate through it: put an authenticating proxy in front or serve the page on loopback only"
            )
        return warnings

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment(...).options(...)` keyword arguments for these settings."""
        options: dict[str, Any] = {
            # Ray must hand every request to a replica so that the replica itself answers 503 (with JSON and
            # Retry-After) once `replica_capacity` chat requests wait there; the slots on top serve /health.
            "max_ongoing_requests": self.replica_capacity + CONTROL_SLOTS,
            "ray_actor_options": {"num_cpus": self.num_cpus_per_replica, "num_gpus": self.num_gpus_per_replica},
        }
        if self.min_replicas is not None or self.max_replicas is not None:
            low = 1 if self.min_replicas is None else self.min_replicas
            options["autoscaling_config"] = {
                "min_replicas": low,
                "max_replicas": max(low, 1) if self.max_replicas is None else self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or self.max_batch_size,
            }
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options

    def to_dict(self) -> dict[str, Any]:
        """Plain settings (what a replica is built from; `from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], convert_strings: bool = False) -> ServeOptions:
        """Options from a mapping (a Serve config's `args:`); unknown keys are an error naming them.
        `convert_strings`: numbers and booleans may be given as text (`serve run ... key=value`)."""
        if not isinstance(data, dict):
            raise InputError(f"serve options must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown serve options {unknown}; known: {', '.join(sorted(names))}")
        if convert_strings:
            data = {name: _from_text(name, value) for name, value in data.items()}
        return cls(**data)


def _from_text(name: str, value: Any) -> Any:
    """`value` converted to the type of option `name` when it is text."""
    if not isinstance(value, str):
        return value
    try:
        if name in INT_OPTIONS:
            return int(value)
        if name in FLOAT_OPTIONS:
            return float(value)
    except ValueError:
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if name in BOOL_OPTIONS:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise InputError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return value


def _positive_int(name: str, value: Any, maximum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (maximum and value > maximum):
        bound = f" and <= {maximum}" if maximum else ""
        raise InputError(f"{name} must be an integer >= 1{bound}, got {value!r}")


def _non_negative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}")


def _non_negative(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise InputError(f"{name} must be a number >= 0, got {value!r}")


def check_local_paths(options: ServeOptions) -> None:
    """Fail fast, before Ray starts, on paths this machine can check (the replicas check them again)."""
    from ..inference import inspect_checkpoint

    inspect_checkpoint(options.model_path)
    for name in ("adapter", "allowed_local_media_path"):
        value = getattr(options, name)
        if value is not None and not Path(value).expanduser().is_dir():
            raise InputError(f"{name} {value} is not a folder")
