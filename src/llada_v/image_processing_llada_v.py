"""Image processor of LLaDA-V: SigLIP crops for any-resolution images, multi-image prompts and videos.

Pixel values reproduce the official LLaDA-V preprocessing bit for bit (docs/parity.md Q1-Q7, Q29-Q33;
checked against the golden fixtures by tests/test_image_processing.py). Notable facts:
- Pillow bicubic resizing (Pillow < 13), then `uint8 * (1/255)` in float64, cast to float32, then
  `(x - mean) / std` in float32 with mean = std = 0.5;
- "anyres": crop 0 is the WHOLE image squashed to one crop (aspect ratio not kept) [keep, docs/parity.md Q1];
  the tiles come from an aspect-preserving resize (`ceil`, capped) pasted centred on a black canvas of the
  best grid pinpoint, cut row-major;
- the image is resized and pasted in its own mode (RGB, L, RGBA, LA) and converted to RGB last [keep, Q29]:
  Pillow resizes RGBA with premultiplied alpha, so fully transparent areas come out black;
- a prompt with several images uses the "pad" path: pad to a square with (127, 127, 127), squash, one
  crop (730 tokens); a video is one crop per sampled frame (210 tokens per frame);
- EXIF orientation is applied [fix, Q32]; palette, 16-bit, CMYK and other modes get a documented conversion
  first (see `docs/processor.md`); undecodable, empty and oversized inputs raise `ValueError`.

Sizes are (height, width) everywhere; PIL's (width, height) is converted once, here. The token count
of each image comes from `image_layout_llada_v.num_image_tokens`, the function the model packs with.
"""

import http.client
import io
import math
import os
import socket
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# First of the transformers imports: an unsupported release stops here with one line (docs/errors.md).
from .compat_llada_v import TRANSFORMERS_RANGE  # noqa: F401  # isort: skip
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.utils import logging

from .image_layout_llada_v import (
    LAYOUT_ANYRES,
    LAYOUT_NAMES,
    LAYOUT_SINGLE,
    LAYOUT_VIDEO,
    default_grid_pinpoints,
    layout_kwargs,
    num_crops,
    num_image_tokens,
    prompt_image_layout,
    select_best_resolution,
)
from .image_resize_llada_v import resize_bicubic

logger = logging.get_logger(__name__)

# Modes the official path resizes as they are (converting to RGB only at the end). Everything else is
# converted to one of these first (see `_normalize_mode`).
DEFAULT_URL_TIMEOUT = 10.0  # seconds for a whole image download
DEFAULT_MAX_URL_BYTES = 32 * 1024 * 1024  # the largest image download accepted
_NATIVE_MODES = ("RGB", "L", "RGBA", "LA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION_TAG = 0x0112
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".wmv", ".mpg", ".mpeg")


class LladaVImagesKwargs(TypedDict, total=False):
    """Settings of `LladaVImageProcessor` that `from_pretrained(..., **kwargs)` may override."""

    crop_size: int
    patch_size: int
    image_grid_pinpoints: list
    max_num_tiles: int
    anyres_pool_threshold: float
    video_pool_stride: int
    max_frames: int
    max_image_pixels: int
    url_timeout: float
    max_url_bytes: int
    image_mean: list
    image_std: list
    rescale_factor: float


def _is_frame_like(obj: Any) -> bool:
    """One picture: a PIL image, a 2-D/3-D array or tensor, a path or encoded bytes."""
    if isinstance(obj, (Image.Image, str, os.PathLike, bytes, bytearray)):
        return True
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.ndim in (2, 3)
    return False


def _is_stacked_video(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim == 4


def sample_frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """Indices of the frames kept from a video of `num_frames` frames.

    All frames are kept when there are at most `max_frames`; otherwise `max_frames` indices spread
    uniformly with `np.linspace(0, num_frames - 1, max_frames, dtype=int)` (the official evaluation's rule,
    first and last frame included). Unlike the official loader, short videos are not padded by repeating
    frames.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames} frames")
    if max_frames < 1:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [int(i) for i in np.linspace(0, num_frames - 1, max_frames, dtype=int)]


class LladaVImageProcessor(BaseImageProcessor):
    r"""
    Builds the SigLIP crops of LLaDA-V for images and videos (PIL + numpy only).

    Each image or video becomes one `<image>` placeholder in the prompt; its layout decides the crops:

    - `LAYOUT_ANYRES` (an image alone in its prompt): the whole image squashed to `crop_size`, then the tiles
      of the best grid pinpoint, row-major;
    - `LAYOUT_SINGLE` (prompts with several images): the image padded to a square with the mean colour
      (127, 127, 127) and squashed, one crop;
    - `LAYOUT_VIDEO`: at most `max_frames` uniformly sampled frames, each squashed, one crop per frame.

    Args:
        crop_size (`int`, defaults to 384): side of every crop (SigLIP's input size).
        patch_size (`int`, defaults to 14): SigLIP's patch size; `crop_size // patch_size` patches per side.
        image_grid_pinpoints (`list[list[int]]`, *optional*): candidate tilings as (height, width) pairs of
            multiples of `crop_size`, in the order that breaks ties. Defaults to (1x1)..(6x6) crops, width outer.
        max_num_tiles (`int`, defaults to 4): the "anyres_max_4" cap of the feature grid (token count only).
        anyres_pool_threshold (`float`, defaults to 1.1): the grid is pooled only above this factor.
        video_pool_stride (`int`, defaults to 2): video frames' patch grids are pooled by this stride.
        max_frames (`int`, defaults to 32): longer videos are sampled uniformly down to this many frames.
        max_image_pixels (`int`, *optional*): the largest `width * height` accepted from any source (files, URLs,
            bytes, PIL images, arrays); defaults to `PIL.Image.MAX_IMAGE_PIXELS` (89,478,485).
        url_timeout (`float`, defaults to 10.0): seconds an image URL may take to download.
        max_url_bytes (`int`, defaults to 33,554,432): the largest image download accepted.
        image_mean (`list[float]`, defaults to `[0.5, 0.5, 0.5]`), image_std (`list[float]`, defaults to
            `[0.5, 0.5, 0.5]`): SigLIP normalisation. The multi-image pad colour is `int(mean * 255)`.
        rescale_factor (`float`, defaults to `1/255`): uint8 to [0, 1], computed in float64.

    Calling the processor returns a `BatchFeature` with `pixel_values` (float32, `(total_crops, 3, S, S)`,
    the crops of all images in order), `image_sizes` (int64 `(num_images, 2)`, (height, width) after EXIF
    orientation; a video's frame size), `image_layouts` (int64 layout codes), `image_num_crops` (int64) and
    `num_image_tokens` (a list of ints: how many image tokens each placeholder becomes).
    """

    model_input_names = ["pixel_values", "image_sizes", "image_layouts", "image_num_crops"]
    valid_kwargs = LladaVImagesKwargs

    def __init__(
        self,
        crop_size: int = 384,
        patch_size: int = 14,
        image_grid_pinpoints: list | None = None,
        max_num_tiles: int = 4,
        anyres_pool_threshold: float = 1.1,
        video_pool_stride: int = 2,
        max_frames: int = 32,
        max_image_pixels: int | None = None,
        url_timeout: float = DEFAULT_URL_TIMEOUT,
        max_url_bytes: int = DEFAULT_MAX_URL_BYTES,
        image_mean: list | None = None,
        image_std: list | None = None,
        rescale_factor: float = 1 / 255,
        **kwargs,
    ) -> None:
        # Saved by older versions or by the mixins; not settings of this class.
        for key in ("image_processor_type", "processor_class", "_processor_class"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.crop_size = crop_size
        self.patch_size = patch_size
        if image_grid_pinpoints is None and isinstance(crop_size, int) and crop_size > 0:
            image_grid_pinpoints = default_grid_pinpoints(crop_size)
        self.image_grid_pinpoints = (
            [list(pair) for pair in image_grid_pinpoints] if image_grid_pinpoints is not None else None
        )
        self.max_num_tiles = max_num_tiles
        self.anyres_pool_threshold = anyres_pool_threshold
        self.video_pool_stride = video_pool_stride
        self.max_frames = max_frames
        self.max_image_pixels = max_image_pixels
        self.url_timeout = url_timeout
        self.max_url_bytes = max_url_bytes
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.rescale_factor = rescale_factor
        self.validate()

    # ------------------------------------------------------------------ settings

    @classmethod
    def from_model_config(cls, config: Any, **kwargs) -> "LladaVImageProcessor":
        """Build the image processor that matches a `LladaVConfig` (crop size, patch size, pinpoints, caps).

        Args:
            config (`LladaVConfig`): the model configuration.
            kwargs: overrides, e.g. `max_frames`.
        """
        settings = {
            "crop_size": config.vision_config.image_size,
            "patch_size": config.vision_config.patch_size,
            "image_grid_pinpoints": [list(pair) for pair in config.image_grid_pinpoints],
            "max_num_tiles": config.max_num_tiles,
            "anyres_pool_threshold": config.anyres_pool_threshold,
            "video_pool_stride": config.video_pool_stride,
        }
        settings.update(kwargs)
        return cls(**settings)

    @property
    def patches_per_side(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # The official multi-image path pads with `tuple(int(x * 255) for x in image_mean)`: (127, 127, 127).
        return tuple(int(x * 255) for x in self.image_mean)

    def layout_kwargs(self) -> dict:
        """Keyword arguments of `image_layout_llada_v.num_image_tokens` (as `LladaVConfig.layout_kwargs`)."""
        return layout_kwargs(self)

    def get_num_image_tokens(self, layout: int, image_size: tuple[int, int] | None = None, num_frames: int = 1) -> int:
        """Tokens one placeholder becomes for an image of `image_size` (height, width) or a video of `num_frames`."""
        return num_image_tokens(layout, image_size, num_frames, **self.layout_kwargs())

    def validate(self) -> None:
        """Check the settings; raises `ValueError` naming the offending values."""
        for name in ("crop_size", "patch_size", "max_num_tiles", "video_pool_stride", "max_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.patch_size > self.crop_size:
            raise ValueError(f"patch_size ({self.patch_size}) must not exceed crop_size ({self.crop_size})")
        pinpoints = self.image_grid_pinpoints
        if not isinstance(pinpoints, list) or len(pinpoints) == 0:
            raise ValueError(
                f"image_grid_pinpoints must be a non-empty list of (height, width) pairs, got {pinpoints!r}"
            )
        for pair in pinpoints:
            if (
                len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                or not all(v > 0 and v % self.crop_size == 0 for v in pair)
            ):
                raise ValueError(
                    f"every grid pinpoint must be a (height, width) pair of positive multiples of crop_size "
                    f"({self.crop_size}), got {pair!r}"
                )
        threshold = self.anyres_pool_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"anyres_pool_threshold must be a positive number, got {threshold!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{name} must hold 3 numbers (one per RGB channel), got {values!r}")
        if any(v == 0 for v in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std!r}")
        if not all(0.0 <= v <= 1.0 for v in self.image_mean):
            raise ValueError(f"image_mean values must be in [0, 1], got {self.image_mean!r}")
        factor = self.rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"rescale_factor must be a positive number, got {factor!r}")
        for name in ("max_image_pixels", "max_url_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        timeout = self.url_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"url_timeout must be a positive number of seconds, got {timeout!r}")

    def load(self, image: Any) -> Image.Image:
        """`load_image` with this processor's limits (pixels, URL timeout and size)."""
        return load_image(image, self.max_image_pixels, self.url_timeout, self.max_url_bytes)

    @property
    def pixel_limit(self) -> int | None:
        """`max_image_pixels`, or Pillow's decompression-bomb limit when it is None (None: Pillow's is off too)."""
        return Image.MAX_IMAGE_PIXELS if self.max_image_pixels is None else self.max_image_pixels

    def working_pixels(self, layout: int, image_size: tuple[int, int]) -> int:
        """The largest pixel array an input makes the processor build for one image of `image_size` (height, width).

        The image itself (`height * width`), or, in a prompt with several images (`LAYOUT_SINGLE`), the square it
        is padded to (`max(height, width) ** 2`: a 1 x 20000 image works on 400,000,000 pixels). Resizing works in
        slices of bounded size, and the canvas the anyres tiles are cut from is at most the largest grid pinpoint
        whatever the input. `max_image_pixels` bounds this number (checked before anything is allocated); servers
        can budget requests with it from the image headers, before decoding.
        """
        height, width = int(image_size[0]), int(image_size[1])
        if layout == LAYOUT_SINGLE:
            return max(height, width) ** 2
        return height * width

    def check_working_pixels(self, layout: int, image_size: tuple[int, int], name: str = "an image") -> None:
        """Refuse, before anything is allocated, an image whose `working_pixels` exceed `max_image_pixels`."""
        pixels, limit = self.working_pixels(layout, image_size), self.pixel_limit
        if limit is None or pixels <= limit:
            return
        height, width = int(image_size[0]), int(image_size[1])
        side = max(height, width)
        work = f"has {pixels} pixels"
        if pixels > height * width:
            work = f"is padded to a {side} x {side} square ({pixels} pixels) in a prompt with several images"
        raise ValueError(
            f"{name} of height {height} and width {width} {work}, more than the limit {limit} (max_image_pixels); "
            "crop it, or raise the image processor's max_image_pixels if you trust the input"
        )

    # ------------------------------------------------------------------ public entry points

    def __call__(self, images: Any = None, videos: Any = None, **kwargs) -> BatchFeature:
        return self.preprocess(images=images, videos=videos, **kwargs)

    def preprocess(
        self, images: Any = None, videos: Any = None, return_tensors: str | None = "pt", **kwargs
    ) -> BatchFeature:
        """
        Preprocess images and/or videos.

        Args:
            images: one image, a list of images (ONE prompt: a single image uses the anyres layout, several use
                the multi-image pad layout) or a list of per-prompt lists. An image is a PIL image, a uint8
                array/tensor (HWC for numpy, CHW for torch; 2-D for grayscale), a file path or encoded bytes.
            videos: one video or a list of videos. A video is a list of frames (anything an image can be) or a
                4-D array `(T, H, W, C)` / tensor `(T, C, H, W)`; frames are sampled down to `max_frames`.
                Videos come after the images; use `preprocess_items` to interleave.
            return_tensors (`str`, defaults to `"pt"`): `"pt"` or `"np"`.

        Returns:
            `BatchFeature` with `pixel_values`, `image_sizes`, `image_layouts`, `image_num_crops`, `num_image_tokens`.
        """
        if kwargs:
            logger.warning_once(f"LladaVImageProcessor ignores the keyword arguments {sorted(kwargs)}")
        if images is None and videos is None:
            raise ValueError("LladaVImageProcessor needs `images` or `videos`, got neither")
        items = []
        if images is not None:
            for prompt_images in nest_images(images):
                layout = prompt_image_layout(len(prompt_images))
                items.extend((layout, image) for image in prompt_images)
        if videos is not None:
            items.extend((LAYOUT_VIDEO, video) for video in flatten_videos(videos))
        return self.preprocess_items(items, return_tensors=return_tensors)

    def preprocess_items(self, items: list, return_tensors: str | None = "pt") -> BatchFeature:
        """
        Preprocess visual inputs in placeholder order with explicit layouts (what `LladaVProcessor` calls).

        Args:
            items (`list[tuple[int, Any]]`): `(layout, visual)` pairs; `layout` is `LAYOUT_ANYRES`,
                `LAYOUT_SINGLE` (an image) or `LAYOUT_VIDEO` (a video).
            return_tensors (`str`, defaults to `"pt"`): `"pt"` or `"np"`.
        """
        if return_tensors is None:
            return_tensors = "pt"
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        self.validate()
        crops, sizes, layouts, crop_counts, token_counts = [], [], [], [], []
        for index, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"items[{index}] must be a (layout, visual) pair, got {type(item).__name__}")
            layout, visual = item
            if layout == LAYOUT_VIDEO:
                item_crops, size, frames = self._video_crops(visual)
            elif layout in (LAYOUT_ANYRES, LAYOUT_SINGLE):
                image = self.load(visual)
                size, frames = (image.height, image.width), 1
                self.check_working_pixels(layout, size, f"image {index}")
                item_crops = self._anyres_crops(image) if layout == LAYOUT_ANYRES else self._pad_crop(image)
            else:
                raise ValueError(f"unknown image layout {layout!r} for item {index}; expected one of {LAYOUT_NAMES}")
            expected = num_crops(layout, size, frames, pinpoints=self.image_grid_pinpoints, crop_size=self.crop_size)
            if len(item_crops) != expected:  # a bug, not a user error: the layout module and the crops disagree
                raise RuntimeError(f"item {index}: produced {len(item_crops)} crops, the layout expects {expected}")
            crops.extend(item_crops)
            sizes.append(size)
            layouts.append(layout)
            crop_counts.append(len(item_crops))
            token_counts.append(self.get_num_image_tokens(layout, size, frames))

        side = self.crop_size
        pixel_values = np.stack(crops) if crops else np.zeros((0, 3, side, side), dtype=np.float32)
        data = {
            "pixel_values": pixel_values,
            "image_sizes": np.array(sizes, dtype=np.int64).reshape(-1, 2),
            "image_layouts": np.array(layouts, dtype=np.int64),
            "image_num_crops": np.array(crop_counts, dtype=np.int64),
        }
        if return_tensors == "pt":
            data = {key: torch.from_numpy(value) for key, value in data.items()}
        data["num_image_tokens"] = token_counts
        # No tensor_type: the arrays are built already and `num_image_tokens` must stay a list.
        return BatchFeature(data=data)

    # ------------------------------------------------------------------ layouts

    def _anyres_crops(self, image: Image.Image) -> list[np.ndarray]:
        """Base crop (whole image squashed) + row-major tiles of the padded best-resolution canvas (docs/parity.md Q1)."""
        side = self.crop_size
        width, height = image.size
        best_h, best_w = select_best_resolution((height, width), self.image_grid_pinpoints)
        # Same float expressions as the official `resize_and_pad_image` (scale first, then multiply): an
        # algebraically equal `ceil(H * w / W)` can round differently.
        scale_w = best_w / width
        scale_h = best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), best_w), best_h
        pixels, has_alpha = _pixels(image)
        # Resized in the image's own mode, then placed on a black RGB canvas (the official order, Q1, Q29).
        canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)
        top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
        canvas[top : top + new_h, left : left + new_w] = _to_rgb(resize_bicubic(pixels, (new_h, new_w), has_alpha))
        crops = [self._normalize(_to_rgb(resize_bicubic(pixels, (side, side), has_alpha)))]
        for row in range(0, best_h, side):
            for col in range(0, best_w, side):
                crops.append(self._normalize(canvas[row : row + side, col : col + side]))
        return crops

    def _pad_crop(self, image: Image.Image) -> list[np.ndarray]:
        """Multi-image path: pad to a square with the mean colour, squash to one crop.

        The official code padded in the image's own mode and converted to RGB before resizing; converting
        first gives the same pixels and also works for `L` images, where the official call crashed (docs/parity.md Q29).
        """
        rgb = _to_rgb(_pixels(image)[0])
        height, width = rgb.shape[:2]
        if width != height:
            side = max(width, height)
            square = np.empty((side, side, 3), dtype=np.uint8)
            square[...] = self.pad_color
            top, left = (side - height) // 2, (side - width) // 2
            square[top : top + height, left : left + width] = rgb
            rgb = square
        return [self._normalize(resize_bicubic(rgb, (self.crop_size, self.crop_size)))]

    def _video_crops(self, video: Any) -> tuple[list[np.ndarray], tuple[int, int], int]:
        frames = video_frames(video)
        kept = [frames[i] for i in sample_frame_indices(len(frames), self.max_frames)]
        crops, size = [], None
        for frame in kept:
            image = self.load(frame)
            if size is None:
                size = (image.height, image.width)
            pixels, has_alpha = _pixels(image)
            crops.append(self._normalize(_to_rgb(resize_bicubic(pixels, (self.crop_size, self.crop_size), has_alpha))))
        return crops, size, len(kept)

    def _normalize(self, crop: np.ndarray) -> np.ndarray:
        """RGB uint8 `(S, S, 3)` crop -> float32 (3, S, S): `x * rescale` in float64, float32, `(x - mean) / std`."""
        scaled = (crop.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.array(self.image_mean, dtype=np.float32)
        std = np.array(self.image_std, dtype=np.float32)
        normalized = (scaled - mean) / std
        return np.ascontiguousarray(normalized.transpose(2, 0, 1))  # (3, S, S)


def _pixels(image: Image.Image) -> tuple[np.ndarray, bool]:
    """A loaded image in one of `_NATIVE_MODES` as uint8 `(H, W, C)` and whether its last channel is alpha."""
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return pixels, image.mode in ("RGBA", "LA")


def _to_rgb(pixels: np.ndarray) -> np.ndarray:
    """uint8 L, LA, RGB or RGBA pixels as RGB, as Pillow's `convert("RGB")` (grey replicated, alpha dropped)."""
    channels = pixels.shape[-1]
    if channels in (1, 2):
        return np.repeat(pixels[..., :1], 3, axis=-1)
    return pixels[..., :3]


# ---------------------------------------------------------------------- input handling


def flatten_videos(videos: Any) -> list:
    """A list of videos from one video, a list of videos, or per-prompt lists of videos."""
    if _is_stacked_video(videos):
        return [videos]
    if not isinstance(videos, (list, tuple)):
        raise TypeError(
            f"a video must be a list of frames or a 4-D array/tensor, got {type(videos).__name__}; "
            "decode video files into frames first"
        )
    if _is_frame_list(videos):
        return [list(videos)]  # one video (possibly empty: rejected when processed)
    flat = []
    for entry in videos:
        if _is_stacked_video(entry) or _is_frame_list(entry):
            flat.append(entry)
        elif isinstance(entry, (list, tuple)):
            flat.extend(flatten_videos(entry))  # per-prompt lists of videos
        else:
            raise TypeError(
                f"cannot read a video from {type(entry).__name__}: expected a list of frames or a 4-D array"
            )
    return flat


def _is_frame_list(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and all(_is_frame_like(frame) for frame in obj)


def video_frames(video: Any) -> list:
    """The frames of one video (a list of frames, `(T, H, W, C)` numpy array or `(T, C, H, W)` tensor)."""
    if _is_stacked_video(video):
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise TypeError(f"a video must be a list of frames or a 4-D array/tensor, got {type(video).__name__}")
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame, got 0 frames")
    return frames


def nest_images(images: Any) -> list[list]:
    """Per-prompt lists of images from one image, a list of images (one prompt) or per-prompt lists."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("got an empty list of images")
        if all(isinstance(entry, (list, tuple)) for entry in images):
            return [list(entry) for entry in images]
        if any(isinstance(entry, (list, tuple)) for entry in images):
            raise TypeError("images must be one image, a list of images or a list of per-prompt lists, not a mix")
        return [list(images)]
    if _is_stacked_video(images):
        # A 4-D batch of images: one prompt each, as for a list of per-prompt lists.
        return [[image] for image in images]
    return [[images]]


def load_image(
    image: Any,
    max_pixels: int | None = None,
    url_timeout: float = DEFAULT_URL_TIMEOUT,
    max_url_bytes: int = DEFAULT_MAX_URL_BYTES,
) -> Image.Image:
    """Decode and normalise one image to a loaded PIL image in RGB, L, RGBA or LA mode.

    Accepts a PIL image, a numpy array / torch tensor (any float dtype included), a file path (`str`/`Path`),
    an http(s) URL, or encoded bytes. Files, URLs and bytes go through one decoder. Applies the EXIF
    orientation.

    Args:
        image: the image.
        max_pixels: the largest `width * height` accepted from any source (None: `PIL.Image.MAX_IMAGE_PIXELS`).
        url_timeout: seconds a URL may take in total (connection and download).
        max_url_bytes: the largest download accepted from a URL.

    Raises:
        ValueError: undecodable, truncated, empty or oversized input, or a URL that cannot be fetched (the error
            names the file or URL); `TypeError` for unsupported types; `FileNotFoundError` for a missing file.
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, Image.Image):
        name = f"the {image.format or 'PIL'} image"
        _check_pixels(image.width, image.height, limit, name)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"could not decode {name}: {err}") from err
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        image = _array_to_pil(image)
        _check_pixels(image.width, image.height, limit, "the image array")
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        image = _open_image(fetch_url(image, url_timeout, max_url_bytes), limit, name=image)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray)):
        image = _open_image(image, limit)
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; expected a PIL image, a numpy array, a torch tensor, "
            "a file path, a URL or bytes"
        )
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has zero size (height={image.height}, width={image.width})")
    image = _apply_exif_orientation(image)
    return _normalize_mode(image)


def _check_pixels(width: int, height: int, limit: int | None, name: str) -> None:
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{name} has {width} x {height} = {width * height} pixels, more than the limit {limit} (a decompression-bomb "
            "guard): raise the image processor's max_image_pixels if you trust the input"
        )


def fetch_url(url: str, timeout: float = DEFAULT_URL_TIMEOUT, max_bytes: int = DEFAULT_MAX_URL_BYTES) -> bytes:
    """The body of an http(s) URL: at most `max_bytes`, within `timeout` seconds in all; errors name the URL.

    `timeout` bounds the whole download, not one read: every socket read waits at most `timeout`, and at the
    deadline a watchdog shuts the connection down, so a server that sends its headers and then trickles bytes
    is cut off there too (name resolution is the one step it cannot interrupt).

    Raises:
        ValueError: an HTTP error, an unreachable host, a body over `max_bytes`, a download over `timeout`.
    """
    watchdog = _Watchdog(timeout)
    request = urllib.request.Request(url, headers={"User-Agent": "llada-v"})
    opener = urllib.request.build_opener(_WatchedHTTPHandler(watchdog), _WatchedHTTPSHandler(watchdog))
    response = None
    try:
        with watchdog, opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(f"{url} is {declared} bytes, more than the limit of {max_bytes} bytes")
            body = bytearray()
            # read1: whatever arrived (at most 64 KiB), so the deadline is checked after every byte a server sends
            while chunk := response.read1(1 << 16):
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(f"{url} is larger than the limit of {max_bytes} bytes")
                if watchdog.expired:
                    break
            if watchdog.expired:
                raise TimeoutError
            if response.length:  # what Content-Length promised and never came
                raise ValueError(f"cannot fetch {url}: the connection closed after {len(body)} of {declared} bytes")
            return bytes(body)
    except urllib.error.HTTPError as err:
        raise ValueError(f"cannot fetch {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        if watchdog.expired or isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            if response is None:
                raise ValueError(f"cannot fetch {url}: no answer within {timeout} s") from None
            raise ValueError(f"{url} did not finish downloading within {timeout} s") from None
        reason = getattr(err, "reason", err)
        raise ValueError(f"cannot fetch {url}: {reason}") from None


class _Watchdog:
    """Shuts down the sockets of one download once `timeout` seconds have passed (`with watchdog:` arms it)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:  # connected after the deadline
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:  # a blocked read returns at once
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _WatchedHandlerMixin:
    """urllib's HTTP(S) handler whose connections hand their socket to a `_Watchdog` once connected."""

    def __init__(self, watchdog: _Watchdog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.watchdog = watchdog

    def do_open(self, http_class: type, req: Any, **kwargs: Any) -> Any:
        watchdog = self.watchdog

        class WatchedConnection(http_class):
            def connect(self) -> None:
                super().connect()
                watchdog.watch(self.sock)

        return super().do_open(WatchedConnection, req, **kwargs)


class _WatchedHTTPHandler(_WatchedHandlerMixin, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_WatchedHandlerMixin, urllib.request.HTTPSHandler):
    pass


def _open_image(
    source: str | os.PathLike | bytes | bytearray, limit: int | None, name: str | None = None
) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        name, handle = name or "<bytes>", io.BytesIO(bytes(source))
    else:
        name = str(source)
        if name.lower().endswith(VIDEO_FILE_SUFFIXES):
            raise TypeError(f"{name} looks like a video file; decode it into frames and pass the frames")
        if not Path(name).is_file():
            raise FileNotFoundError(f"image file not found: {name}")
        handle = name
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit: the limit checked below is the one for every source.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(handle)
            _check_pixels(opened.width, opened.height, limit, f"image {name}")
            opened.load()
    except Image.DecompressionBombError as err:  # beyond twice Pillow's own limit, Pillow refuses to open it
        raise ValueError(
            f"image {name} has more pixels than the limit {limit} (Pillow: {err}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "and the image processor's max_image_pixels if you trust the input"
        ) from None
    except UnidentifiedImageError as err:
        raise ValueError(f"cannot identify {name} as an image (corrupt or unsupported format)") from err
    except (OSError, SyntaxError) as err:
        raise ValueError(f"could not decode image {name} (truncated or corrupt): {err}") from err
    return opened


def _array_to_pil(array: np.ndarray | torch.Tensor) -> Image.Image:
    """uint8 (or bool / [0, 1] float / uint16) array or tensor -> PIL image.

    numpy arrays are read as HWC (CHW when the last axis is not 1, 3 or 4); torch tensors as CHW (HWC when the
    first axis is not 1, 3 or 4). 2-D inputs are grayscale.
    """
    channels_first_default = isinstance(array, torch.Tensor)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()  # numpy has no bfloat16; values in [0, 1] are kept exactly
        array = array.numpy()
    if array.ndim == 3:
        first_ok, last_ok = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
        if first_ok and (channels_first_default or not last_ok):
            array = array.transpose(1, 2, 0)
        elif not last_ok:
            raise ValueError(f"cannot find the channel axis of an image array of shape {tuple(array.shape)}")
        if array.shape[-1] == 1:
            array = array[..., 0]
    elif array.ndim != 2:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {tuple(array.shape)}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"image has zero size (height={array.shape[0]}, width={array.shape[1]})")
    array = _to_uint8(array)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _scale_16bit(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("a float image array contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"float image arrays must hold values in [0, 1], got values in [{low}, {high}]")
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"integer image arrays of dtype {array.dtype} must hold values in [0, 255], got [{low}, {high}]; "
                "pass uint16 for 16-bit images"
            )
        return array.astype(np.uint8)
    raise TypeError(f"unsupported image array dtype {array.dtype}")


def _scale_16bit(array: np.ndarray) -> np.ndarray:
    # 16-bit levels to 8-bit by rounding x * 255 / 65535 (Pillow's convert would clip everything above 255).
    values = np.clip(array.astype(np.float64), 0, 65535)
    return np.round(values * (255.0 / 65535.0)).astype(np.uint8)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Honour the EXIF orientation tag (docs/parity.md Q32: the official path ignored it); unrotated images are untouched."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception as err:  # noqa: BLE001 - a broken EXIF block must not make the pixels unusable
        logger.warning_once(f"ignoring an unreadable EXIF block: {err}")
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _normalize_mode(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode to RGB, L, RGBA or LA, which the official path resizes as they are.

    - RGB, L, RGBA, LA: unchanged (RGBA/LA are resized with premultiplied alpha, alpha dropped at the end);
    - P / PA: RGBA when the palette has transparency, else RGB (the official path would have resized the
      palette indices with nearest-neighbour);
    - I;16* / I: 16-bit levels scaled to 8-bit L (Pillow's own conversion clips at 255);
    - 1, F: L (Pillow's conversion: F is clipped to [0, 255]);
    - CMYK, YCbCr, LAB, HSV and others: Pillow's RGB conversion.
    """
    mode = image.mode
    if mode in _NATIVE_MODES:
        return image
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return image.convert("RGBA" if has_alpha else "RGB")
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scale_16bit(np.asarray(image)), mode="L")
    if mode in ("1", "F"):
        return image.convert("L")
    if mode in ("RGBa", "La"):
        return image.convert("RGBA" if mode == "RGBa" else "LA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"unsupported image mode {mode!r}: {err}") from err


__all__ = [
    "LladaVImageProcessor",
    "fetch_url",
    "flatten_videos",
    "load_image",
    "nest_images",
    "sample_frame_indices",
    "video_frames",
]
