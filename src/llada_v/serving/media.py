"""`image_url` parts -> PIL images, under the operator's policy.

- `data:image/...;base64,...`: decoded here (at most `max_image_bytes`), then the bytes go to the library's
  loader (`image_processing_llada_v.load_image`);
- `http://` / `https://`: the library's loader fetches them (refused when `remote` is off) with the policy's
  timeout and size cap;
- `file://`: only below `local_root` (the `--allowed-local-media-path` folder), after resolving `..` and
  symbolic links, so neither escapes it.

Every refusal is an `ApiError` (400) naming the message part and the URL.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..image_processing_llada_v import load_image
from .openai_api import invalid


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from. `local_root` None: no local files."""

    remote: bool = True
    local_root: Path | None = None
    max_image_bytes: int = 10 * 2**20
    fetch_timeout_s: float = 10.0
    max_pixels: int | None = None  # None: the loader's default (Pillow's decompression-bomb limit)

    @classmethod
    def from_options(cls, options: Any, max_pixels: int | None = None) -> "MediaPolicy":
        root = options.allowed_local_media_path
        if root is not None:
            root = Path(root).expanduser().resolve()
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path {options.allowed_local_media_path} is not a folder")
        return cls(options.remote_images, root, options.max_image_bytes, options.image_fetch_timeout_s, max_pixels)


def describe_url(url: str, limit: int = 100) -> str:
    """The URL for an error message (data URLs shortened)."""
    return url if len(url) <= limit else f"{url[:limit]}... ({len(url)} characters)"


def load_image_url(url: str, param: str, policy: MediaPolicy) -> Any:
    """The image an `image_url` part points to, or `ApiError` (400) naming `param` and the URL."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        source: Any = _data_url_bytes(url, param, policy.max_image_bytes)
    elif scheme in ("http", "https"):
        if not policy.remote:
            raise invalid(f"{param}: http(s) image URLs are disabled on this server ({describe_url(url)})", param)
        source = url
    elif scheme == "file":
        source = str(_local_path(url, param, policy.local_root))
    else:
        raise invalid(f"{param}: unsupported image URL {describe_url(url)} (use data:, http(s):// or file://)", param)
    try:
        return _load(source, policy)
    except (ValueError, TypeError, OSError) as err:
        raise invalid(f"{param}: cannot load image {describe_url(url)}: {err}", param) from None
    except Exception as err:  # noqa: BLE001 - the URL fetch raises the HTTP client's own errors
        raise invalid(f"{param}: cannot load image {describe_url(url)}: {type(err).__name__}: {err}", param) from None


def _load(source: Any, policy: MediaPolicy) -> Any:
    """`load_image(source)` under the policy's pixel limit, URL timeout and download size cap."""
    return load_image(source, policy.max_pixels, url_timeout=policy.fetch_timeout_s, max_url_bytes=policy.max_image_bytes)


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise invalid(f"{param}: a data URL must look like data:image/<type>;base64,<data>, got {describe_url(url)}", param)
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:  # base64 length of max_bytes, before decoding it
        raise invalid(f"{param}: image of ~{len(payload) * 3 // 4} bytes exceeds the limit of {max_bytes} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise invalid(f"{param}: invalid base64 in data URL {describe_url(url)}: {err}", param) from None
    if len(data) > max_bytes:
        raise invalid(f"{param}: image of {len(data)} bytes exceeds the limit of {max_bytes} bytes", param)
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
    resolved = path.resolve()  # `..` and every symbolic link followed, so neither can leave the folder
    if not resolved.is_relative_to(root):
        raise invalid(f"{param}: {path} is outside the allowed local media folder {root}", param, "forbidden_path")
    if not resolved.is_file():
        raise invalid(f"{param}: no such file {path}", param)
    return resolved
