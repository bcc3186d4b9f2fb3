"""Bicubic resizing of 8-bit images in numpy, equal bit for bit to Pillow 10.3-12.3's `Image.resize(size,
BICUBIC)` (the official LLaDA-V preprocessing ran Pillow 10.3), whatever Pillow is installed: Pillow 13 changed
its bicubic output, and remote-code users run with the Pillow they have (docs/processor.md, "Resizing").

The algorithm is Pillow's separable convolution (its `libImaging/Resample.c`, re-derived here):

- per output pixel, the input pixels within `support = 2 * max(1, in / out)` of the sampling centre get the
  cubic-convolution weight (a = -0.5) of their distance (scaled by `min(1, out / in)`), normalised to sum 1 in
  float64, then turned into 22-bit fixed point (`int(w * 2**22 +- 0.5)`, truncated);
- a horizontal pass, then a vertical one; each accumulates `pixel * weight` in integers from `2**21` (the
  rounding half) and keeps `clip(acc >> 22, 0, 255)`, so the vertical pass reads 8-bit rounded values;
- a dimension whose size does not change is not resampled; images with alpha are resized premultiplied
  (Pillow's `RGBa`/`La`: `c * a / 255` rounded as `((t >> 8) + t) >> 8` with `t = c * a + 128`) and
  un-premultiplied after (`min(255, 255 * c // a)`, unchanged where `a` is 0 or 255).
"""

import functools

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point: 8-bit results, sign and overflow headroom
_BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5
# float64 values of one slice of columns in a resize pass (32 MiB): bounds the memory of resizing a huge image.
_SLICE_ELEMENTS = 1 << 22


def _bicubic(x: np.ndarray) -> np.ndarray:
    # Pillow's filter, elementwise, with its expressions in the same order (float64 results must match).
    a = _BICUBIC_A
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point taps of a 1-D bicubic resize: `(first, weights)` with `first` `(out,)` the first input index
    of each output and `weights` `(out, taps)` int64 (zero past each output's window)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    taps = int(np.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # (out,)
    # C's (int) truncates toward zero, as np.trunc does.
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    window = offsets[None, :] < count[:, None]  # (out, taps)
    raw = _bicubic(((first[:, None] + offsets[None, :]) - center[:, None] + 0.5) * (1.0 / filterscale))
    raw = np.where(window, raw, 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # left to right, as Pillow sums (a vectorised sum would pair terms differently)
        total += raw[:, tap]
    normalised = np.where(total[:, None] != 0.0, raw / np.where(total == 0.0, 1.0, total)[:, None], raw)
    fixed = np.trunc(np.where(normalised < 0, -0.5, 0.5) + normalised * (1 << PRECISION_BITS)).astype(np.int64)
    return first, np.where(window, fixed, 0)


@functools.lru_cache(maxsize=16)  # the bands of one pass share it; read-only
def _tap_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """The fixed-point taps of a 1-D resize as a sparse float64 `(out, in)` matrix (exact integers)."""
    first, weights = resize_coefficients(in_size, out_size)
    taps = weights.shape[1]
    used = weights != 0
    rows = np.broadcast_to(np.arange(out_size)[:, None], weights.shape)[used]
    cols = (first[:, None] + np.arange(taps)[None, :])[used]
    indices = torch.from_numpy(np.stack((rows, cols)))  # sorted by row, then column: already coalesced
    values = torch.from_numpy(weights[used].astype(np.float64))
    return torch.sparse_coo_tensor(indices, values, (out_size, in_size), is_coalesced=True, check_invariants=False)


def _resample_leading(source: torch.Tensor, out_size: int) -> torch.Tensor:
    """One pass along the first axis of a uint8 `(in, columns)` tensor -> uint8 `(out, columns)`.

    A sparse float64 product: every product and partial sum is an integer below 2**40, which float64 holds
    exactly, so the result does not depend on the summation order: it is Pillow's integer arithmetic. Then
    Pillow's `clip((sum + 2**21) >> 22, 0, 255)`, in place: clipping the sum first, adding the half and scaling
    by 2**-22 are exact in float64, and the cast truncates the now non-negative values (the floor of the shift).
    Columns are independent, so they go through in slices of at most `_SLICE_ELEMENTS` float64 values: the
    memory beyond the uint8 input and output stays bounded whatever the image size.
    """
    taps = _tap_matrix(source.shape[0], out_size)
    out = torch.empty((out_size, source.shape[1]), dtype=torch.uint8)
    step = max(1, _SLICE_ELEMENTS // max(source.shape[0], out_size))
    half = 1 << (PRECISION_BITS - 1)
    for start in range(0, source.shape[1], step):
        acc = torch.sparse.mm(taps, source[:, start : start + step].to(torch.float64))
        acc.clamp_(-half, (256 << PRECISION_BITS) - 1 - half).add_(half).mul_(1.0 / (1 << PRECISION_BITS))
        out[:, start : start + step] = acc.to(torch.uint8)
    return out


def _resample_rows(image: torch.Tensor, out_width: int) -> torch.Tensor:
    """The horizontal pass of a uint8 `(H, W, C)` tensor -> uint8 `(H, W', C)`, in bands of rows, so that the
    transposed copy a pass along the width needs is one band at a time, not the whole image."""
    in_height, in_width, channels = image.shape
    out = torch.empty((in_height, out_width, channels), dtype=torch.uint8)
    band = max(1, _SLICE_ELEMENTS // (max(in_width, out_width) * channels))
    for top in range(0, in_height, band):
        rows = image[top : top + band]
        columns = rows.permute(1, 0, 2).reshape(in_width, rows.shape[0] * channels)  # (W, band*C)
        out[top : top + band] = _resample_leading(columns, out_width).reshape(out_width, -1, channels).permute(1, 0, 2)
    return out


def _premultiply(pixels: np.ndarray) -> np.ndarray:
    # uint16 holds every intermediate exactly: c * a + 128 <= 65153 and ((t >> 8) + t) <= 65407.
    alpha = pixels[..., -1:].astype(np.uint16)
    t = pixels[..., :-1].astype(np.uint16) * alpha + 128
    colour = ((t >> 8) + t) >> 8
    return np.concatenate((colour.astype(np.uint8), pixels[..., -1:]), axis=-1)


def _unpremultiply(pixels: np.ndarray) -> np.ndarray:
    # uint16 holds 255 * c <= 65025 exactly.
    alpha = pixels[..., -1:].astype(np.uint16)
    colour = pixels[..., :-1].astype(np.uint16)
    divided = np.minimum(255 * colour // np.maximum(alpha, 1), 255)
    keep = (alpha == 0) | (alpha == 255)
    colour = np.where(keep, colour, divided)
    return np.concatenate((colour.astype(np.uint8), pixels[..., -1:]), axis=-1)


def resize_bicubic(pixels: np.ndarray, size_hw: tuple[int, int], has_alpha: bool = False) -> np.ndarray:
    """Resize a uint8 `(H, W, C)` image to `size_hw = (height, width)` as Pillow 12's bicubic `resize` does.

    Args:
        pixels: uint8 `(H, W, C)`; C is 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA).
        size_hw: the output (height, width), both positive.
        has_alpha: the last channel is alpha (LA, RGBA): resized premultiplied, as Pillow does.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected a uint8 (H, W, C) array, got {pixels.dtype} of shape {tuple(pixels.shape)}")
    height, width = int(size_hw[0]), int(size_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"the output size must be positive, got (height={height}, width={width})")
    if (height, width) == pixels.shape[:2]:
        return pixels.copy()
    source = _premultiply(pixels) if has_alpha else pixels
    if not source.flags.writeable:  # arrays of PIL images are read-only, which torch.from_numpy warns about
        source = np.array(source, order="C")
    out = torch.from_numpy(source)  # (H, W, C); never written to: each pass makes new tensors
    in_height, in_width, channels = out.shape
    if width != in_width:  # horizontal pass first, as Pillow
        out = _resample_rows(out, width)  # (H, W', C)
    if height != in_height:
        rows = out.reshape(in_height, width * channels)  # (H, W'*C)
        out = _resample_leading(rows, height).reshape(height, width, channels)
    out = out.contiguous().numpy()
    return _unpremultiply(out) if has_alpha else out


__all__ = ["resize_bicubic", "resize_coefficients"]
