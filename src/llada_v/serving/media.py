"""`image_url` parts -> encoded images, under the operator's policy, and what they will cost to process.

- `data:image/...;base64,...`: decoded here (at most `max_image_bytes`);
- `http://` / `https://`: downloaded by the library's `image_processing_llada_v.fetch_url` (refused when `remote`
  is off) with the size cap, cut off at the request's deadline;
- `file://`: only below `local_root` (the `--allowed-local-media-path` folder), after resolving `..` and
  symbolic links, so neither escapes it; read once, here (at most `max_image_bytes`), so the file cannot change
  between the check and its use.

The result is the image's encoded bytes: a request holds those while it waits (not decoded pixels), and the image
processor decodes them with the library's one loader. `header_pixels` reads only the headers, so a request's pixel
budget is checked before anything is decoded. Every refusal is an `ApiError` (400) naming the message part and
the URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .. import image_processing_llada_v as loader
from ..image_layout_llada_v import prompt_image_layout
from .openai_api import invalid

REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from. `local_root` None: no local files."""

    remote: bool = True
    local_root: Path | None = None
    max_image_bytes: int = 10 * 2**20
    fetch_timeout_s: float = 10.0
    max_pixels: int | None = None  # None: the loader's default (Pillow's decompression-bomb limit)

    @classmethod
    def from_options(cls, options: Any, max_pixels: int | None = None) -> MediaPolicy:
        root = options.allowed_local_media_path
        if root is not None:
            root = Path(root).expanduser().resolve()
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path {options.allowed_local_media_path} is not a folder")
        return cls(options.remote_images, root, options.max_image_bytes, options.image_fetch_timeout_s, max_pixels)


def describe_url(url: str, limit: int = 100) -> str:
    """The URL for an error message (data URLs and long paths shortened)."""
    return url if len(url) <= limit else f"{url[:limit]}... ({len(url)} characters)"


def url_scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def is_remote(url: str) -> bool:
    """Whether fetching `url` goes over the network (and may take until the deadline)."""
    return url_scheme(url) in REMOTE_SCHEMES


def read_image_url(url: str, param: str, policy: MediaPolicy, deadline: float | None = None) -> bytes:
    """The encoded image an `image_url` part points to, or `ApiError` (400) naming `param` and the URL.

    Args:
        deadline: `time.monotonic()` by which an http(s) download must be complete (None: `fetch_timeout_s` from now).
    """
    scheme = url_scheme(url)
    if scheme == "data":
        return _data_url_bytes(url, param, policy.max_image_bytes)
    if scheme in REMOTE_SCHEMES:
        if not policy.remote:
            raise invalid(f"{param}: http(s) image URLs are disabled on this server ({describe_url(url)})", param)
        return _download(url, param, policy, deadline)
    if scheme == "file":
        return _local_bytes(url, param, policy)
    raise invalid(f"{param}: unsupported image URL {describe_url(url)} (use data:, http(s):// or file://)", param)


def load_image_url(url: str, param: str, policy: MediaPolicy) -> Any:
    """The decoded image an `image_url` part points to (`read_image_url`, then the library's loader)."""
    data = read_image_url(url, param, policy)
    try:
        return loader.load_image(data, policy.max_pixels)
    except (ValueError, TypeError, OSError) as err:
        raise invalid(f"{param}: cannot load image {describe_url(url)}: {err}", param) from None


def header_pixels(sources: list[bytes], params: list[str], urls: list[str], image_processor: Any) -> list[int]:
    """The pixels each encoded image will cost the image processor (`working_pixels`), read from the headers alone.

    An image over the processor's own limit (`max_image_pixels`, the padded square of a thin image included) is an
    `ApiError` (400) naming the part, before anything is decoded.
    """
    layout = prompt_image_layout(len(sources))
    pixels = []
    for data, param, url in zip(sources, params, urls):
        height, width = _header_size(data, param, url)
        try:
            image_processor.check_working_pixels(layout, (height, width), f"the image at {param}")
        except ValueError as err:
            raise invalid(f"{param}: {err}", param, "image_too_large") from None
        pixels.append(image_processor.working_pixels(layout, (height, width)))
    return pixels


def check_request_pixels(pixels: list[int], params: list[str], limit: int) -> None:
    """`ApiError` (400) when a request's images need more than `limit` pixels in all, naming each image's share."""
    total = sum(pixels)
    if total <= limit:
        return
    shares = ", ".join(f"{param}: {count}" for param, count in zip(params, pixels))
    raise invalid(
        f"the request's images need {total} pixels ({shares}), more than this server's limit of {limit} pixels per "
        "request (max_request_pixels); send smaller images",
        "messages",
        "image_too_large",
    )


def _header_size(data: bytes, param: str, url: str) -> tuple[int, int]:
    """(height, width) from the image's header; Pillow decodes nothing until `load()`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.height, image.width
    except Image.DecompressionBombError as err:
        message = f"{param}: image {describe_url(url)} has too many pixels ({err})"
        raise invalid(message, param, "image_too_large") from None
    except UnidentifiedImageError:
        raise invalid(f"{param}: cannot load image {describe_url(url)}: not an image Pillow can identify (corrupt or "
                      "unsupported format)", param) from None  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a malformed header raises whatever its Pillow plugin raises
        raise invalid(f"{param}: cannot load image {describe_url(url)}: {type(err).__name__}: {err}", param) from None


def _download(url: str, param: str, policy: MediaPolicy, deadline: float | None) -> bytes:
    timeout = policy.fetch_timeout_s
    if deadline is None:
        deadline = time.monotonic() + timeout
    remaining = deadline - time.monotonic()
    late = invalid(f"{param}: {describe_url(url)} took longer than {timeout} s to download (the server's "
                   "image_fetch_timeout_s for a request's images)", param, "image_fetch_timeout")  # fmt: skip
    if remaining <= 0:  # waited for a download thread until the request's deadline
        raise late
    try:
        return loader.fetch_url(url, remaining, policy.max_image_bytes)
    except ValueError as err:
        if time.monotonic() >= deadline:
            raise late from None
        raise invalid(f"{param}: cannot load image {describe_url(url)}: {err}", param) from None
    except Exception as err:  # noqa: BLE001 - the HTTP client's own errors: still this request's bad URL
        raise invalid(f"{param}: cannot load image {describe_url(url)}: {type(err).__name__}: {err}", param) from None


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise invalid(
            f"{param}: a data URL must look like data:image/<type>;base64,<data>, got {describe_url(url)}", param
        )
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:  # base64 length of max_bytes, before decoding it
        raise invalid(f"{param}: image of ~{len(payload) * 3 // 4} bytes exceeds the limit of {max_bytes} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid(f"{param}: invalid base64 in data URL {describe_url(url)}: {err}", param) from None
    if len(data) > max_bytes:
        raise invalid(f"{param}: image of {len(data)} bytes exceeds the limit of {max_bytes} bytes", param)
    return data


def _local_bytes(url: str, param: str, policy: MediaPolicy) -> bytes:
    path = _local_path(url, param, policy.local_root)
    try:
        with open(path, "rb") as handle:
            data = handle.read(policy.max_image_bytes + 1)
    except OSError as err:
        raise invalid(f"{param}: cannot read {describe_url(url)}: {err.strerror or err}", param) from None
    if len(data) > policy.max_image_bytes:
        raise invalid(f"{param}: {describe_url(url)} is larger than the limit of {policy.max_image_bytes} bytes", param)
    return data


def _local_path(url: str, param: str, root: Path | None) -> Path:
    if root is None:
        raise invalid(f"{param}: local files are disabled on this server ({describe_url(url)}); the operator can "
                      "allow a folder with --allowed-local-media-path", param)  # fmt: skip
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise invalid(f"{param}: file URL with host {parsed.netloc!r} ({describe_url(url)}); use file:///PATH", param)
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        raise invalid(f"{param}: file URLs need an absolute path, got {describe_url(url)}", param)
    try:
        resolved = path.resolve()  # `..` and every symbolic link followed, so neither can leave the folder
        inside = resolved.is_relative_to(root)
        is_file = inside and resolved.is_file()
    except (OSError, ValueError, RuntimeError) as err:  # a NUL byte, a name or path too long, a symlink loop
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise invalid(f"{param}: unusable file URL {describe_url(url)}: {reason}", param) from None
    if not inside:
        raise invalid(f"{param}: {describe_url(str(path))} is outside the allowed local media folder {root}", param,
                      "forbidden_path")  # fmt: skip
    if not is_file:
        raise invalid(f"{param}: no such file {describe_url(str(path))}", param)
    return resolved
