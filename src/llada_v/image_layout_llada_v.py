"""Image layout arithmetic shared by the LLaDA-V image processor and model (pure Python, no tensors).

The processor and the model must agree on how many `<image>` tokens one image becomes; both call
`num_image_tokens` / `select_best_resolution` from here, so the count is written once.

Notable facts (docs/parity.md Q1-Q5, "anyres_max_4"):
- sizes are (height, width) everywhere; grid pinpoints are (height, width) pairs whose order matters,
  because ties in `select_best_resolution` go to the first candidate;
- the base crop is the whole image squashed to one crop, placed first (729 tokens, no newline);
- the tile grid is unpadded with `int` truncation, pooled bilinearly when it is larger than
  `max_num_tiles` crops (factor > 1.1), then one newline token ends every row.
"""

import math
from typing import Any

# How an image is laid out in the token sequence; the processor returns one code per image.
LAYOUT_ANYRES = 0  # base crop + tiles, unpad, optional bilinear cap, newline per row
LAYOUT_SINGLE = 1  # one crop + one newline (multi-image prompts: 730 tokens with 729 patches)
LAYOUT_VIDEO = 2  # frames, each pooled to ceil(side / 2) per side, newline per row
LAYOUT_NAMES = {LAYOUT_ANYRES: "anyres", LAYOUT_SINGLE: "single", LAYOUT_VIDEO: "video"}


def prompt_image_layout(num_images: int) -> int:
    """The layout of each image of a prompt with `num_images` images: anyres when the image is alone, one
    padded crop each when there are several (the official multi-image path)."""
    return LAYOUT_ANYRES if num_images == 1 else LAYOUT_SINGLE


def layout_kwargs(settings: Any) -> dict:
    """The layout arguments of `num_image_tokens`, read from a `LladaVConfig` or a `LladaVImageProcessor`
    (both carry `image_grid_pinpoints`, `crop_size`, `patches_per_side`, `max_num_tiles`,
    `anyres_pool_threshold` and `video_pool_stride`)."""
    return {
        "pinpoints": settings.image_grid_pinpoints,
        "crop_size": settings.crop_size,
        "patches_per_side": settings.patches_per_side,
        "max_num_tiles": settings.max_num_tiles,
        "pool_threshold": settings.anyres_pool_threshold,
        "video_pool_stride": settings.video_pool_stride,
    }


def default_grid_pinpoints(crop_size: int = 384, max_grid: int = 6) -> list[list[int]]:
    """The released `(1x1),...,(6x6)` pinpoints as (height, width) pairs, in the official order.

    LLaVA writes them as [width, height] with width outer and height inner; we keep that order (it
    decides ties) and only swap each pair to (height, width).
    """
    return [[crop_size * j, crop_size * i] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]


def select_best_resolution(image_size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """Pick the pinpoint (height, width) that keeps the most image pixels, wasting the least canvas.

    Args:
        image_size: original (height, width) in pixels.
        pinpoints: candidate (height, width) pairs; ties go to the first one.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    best = None
    max_effective = 0
    min_wasted = float("inf")
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = cand_w * cand_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best = effective, wasted, (int(cand_h), int(cand_w))
    if best is None:
        raise ValueError(f"no grid pinpoint fits image size {(height, width)}; pinpoints: {pinpoints}")
    return best


def anyres_grid_shape(image_size: tuple[int, int], pinpoints: list, crop_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image. Raises instead of the official silent 2x2 fallback."""
    best_h, best_w = select_best_resolution(image_size, pinpoints)
    if best_h % crop_size or best_w % crop_size:
        raise ValueError(f"grid pinpoint {(best_h, best_w)} is not a multiple of the crop size {crop_size}")
    return best_h // crop_size, best_w // crop_size


def unpadded_shape(image_size: tuple[int, int], current_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows/columns of a (current_h, current_w) feature grid kept after removing the letterbox padding.

    Returns (row_start, row_end, col_start, col_end). Follows the official arithmetic: the kept size is
    `int(side * scale)` and `(current - kept) // 2` is removed at both ends [keep int rounding].
    """
    height, width = image_size
    cur_h, cur_w = current_hw
    if width / height > cur_w / cur_h:
        scale = cur_w / width
        new_h = int(height * scale)
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    scale = cur_h / height
    new_w = int(width * scale)
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def pooled_shape(
    grid_hw: tuple[int, int], max_num_tiles: int, patches_per_side: int, pool_threshold: float
) -> tuple[int, int] | None:
    """Target (h, w) of the anyres_max bilinear cap, or None when the factor is at most `pool_threshold`."""
    h, w = grid_hw
    times = math.sqrt(h * w / (max_num_tiles * patches_per_side**2))
    if times > pool_threshold:
        return int(h // times), int(w // times)
    return None


def anyres_feature_grid(
    image_size: tuple[int, int],
    pinpoints: list,
    crop_size: int,
    patches_per_side: int,
    max_num_tiles: int,
    pool_threshold: float,
) -> dict:
    """Every shape of the anyres packing for one image: tiles, unpad window and final grid."""
    rows, cols = anyres_grid_shape(image_size, pinpoints, crop_size)
    full = (rows * patches_per_side, cols * patches_per_side)
    r0, r1, c0, c1 = unpadded_shape(image_size, full)
    unpadded = (r1 - r0, c1 - c0)
    pooled = pooled_shape(unpadded, max_num_tiles, patches_per_side, pool_threshold)
    final = pooled if pooled is not None else unpadded
    return {
        "grid_rows_cols": (rows, cols),
        "num_crops": 1 + rows * cols,
        "unpad_window": (r0, r1, c0, c1),
        "unpadded_hw": unpadded,
        "final_hw": final,
    }


def video_pooled_side(patches_per_side: int, stride: int) -> int:
    return math.ceil(patches_per_side / stride)


def num_image_tokens(
    layout: int,
    image_size: tuple[int, int] | None = None,
    num_frames: int = 1,
    *,
    pinpoints: list,
    crop_size: int,
    patches_per_side: int,
    max_num_tiles: int,
    pool_threshold: float,
    video_pool_stride: int,
) -> int:
    """Number of tokens one `<image>` placeholder becomes in the model's merged sequence."""
    base = patches_per_side * patches_per_side
    if layout == LAYOUT_ANYRES:
        if image_size is None:
            raise ValueError("the anyres layout needs the image size (height, width)")
        grid = anyres_feature_grid(image_size, pinpoints, crop_size, patches_per_side, max_num_tiles, pool_threshold)
        h, w = grid["final_hw"]
        return base + h * (w + 1)
    if layout == LAYOUT_SINGLE:
        return base + 1
    if layout == LAYOUT_VIDEO:
        if num_frames < 1:
            raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
        side = video_pooled_side(patches_per_side, video_pool_stride)
        return num_frames * side * (side + 1)
    raise ValueError(f"unknown image layout {layout}; expected one of {LAYOUT_NAMES}")


def num_crops(
    layout: int, image_size: tuple[int, int] | None, num_frames: int, *, pinpoints: list, crop_size: int
) -> int:
    """Number of crops (SigLIP inputs) one image or video contributes to `pixel_values`."""
    if layout == LAYOUT_ANYRES:
        rows, cols = anyres_grid_shape(image_size, pinpoints, crop_size)
        return 1 + rows * cols
    if layout == LAYOUT_SINGLE:
        return 1
    if layout == LAYOUT_VIDEO:
        return num_frames
    raise ValueError(f"unknown image layout {layout}; expected one of {LAYOUT_NAMES}")
