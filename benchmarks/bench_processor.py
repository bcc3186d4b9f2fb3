"""Time `LladaVImageProcessor` on one image with its own bicubic resizer (`image_resize_llada_v`, independent of
the installed Pillow) against the same processor resizing with Pillow's C code (what it did before), in one run.

    python benchmarks/bench_processor.py                      # a 1920x1080 photo-like image, best of 5
    python benchmarks/bench_processor.py --width 853 --height 1280 --repeats 9

Both paths give the same pixels wherever Pillow < 13 is installed (checked here when it is); the ratio is the
cost of not depending on Pillow's version. Prints the median and best times and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pillow_resize(pixels: np.ndarray, size_hw: tuple[int, int], has_alpha: bool = False) -> np.ndarray:
    """Pillow's own bicubic resize on the same arrays (the processor's previous resizer)."""
    channels = pixels.shape[-1]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    out = np.asarray(image.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC))
    return out.reshape(size_hw[0], size_hw[1], channels)


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: resizing work does not depend on content, decoding is not timed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(((x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) % 256)), axis=-1)
    noise = rng.integers(-20, 21, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def time_processor(processor, image: Image.Image, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        processor(images=image)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "src"))
    import llada_v.image_processing_llada_v as module
    from llada_v import LladaVImageProcessor

    processor = LladaVImageProcessor()
    image = photo_like(args.width, args.height)
    processor(images=image)  # warm-up (imports, caches)
    own = time_processor(processor, image, args.repeats)
    ours_pixels = processor(images=image)["pixel_values"]
    original = module.resize_bicubic
    module.resize_bicubic = pillow_resize
    try:
        processor(images=image)
        pillow = time_processor(processor, image, args.repeats)
        pillow_pixels = processor(images=image)["pixel_values"]
    finally:
        module.resize_bicubic = original
    same = bool((ours_pixels == pillow_pixels).all())
    result = {
        "image": f"{args.width}x{args.height}",
        "crops": int(ours_pixels.shape[0]),
        "pillow": PIL.__version__,
        "own_resizer_ms": {"median": 1e3 * statistics.median(own), "best": 1e3 * min(own)},
        "pillow_resizer_ms": {"median": 1e3 * statistics.median(pillow), "best": 1e3 * min(pillow)},
        "ratio_of_medians": statistics.median(own) / statistics.median(pillow),
        "same_pixels": same,
    }
    print(f"{result['image']} image, {result['crops']} crops, Pillow {result['pillow']}, {args.repeats} runs each")
    print(
        f"  own resizer:    median {result['own_resizer_ms']['median']:7.1f} ms, best {result['own_resizer_ms']['best']:7.1f} ms"
    )
    print(
        f"  Pillow resizer: median {result['pillow_resizer_ms']['median']:7.1f} ms, best {result['pillow_resizer_ms']['best']:7.1f} ms"
    )
    print(
        f"  ratio (own / Pillow, medians): {result['ratio_of_medians']:.2f}x; same pixels: {same}"
        + ("" if int(PIL.__version__.split(".")[0]) < 13 else " (Pillow >= 13 resizes differently)")
    )
    return result


if __name__ == "__main__":
    main()
