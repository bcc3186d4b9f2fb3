"""LladaVImageProcessor: golden pixel parity, output contract, layouts, bad inputs and a layout fuzz test."""

import hashlib
import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from llada_v.configuration_llada_v import LladaVConfig
from llada_v.image_layout_llada_v import (
    LAYOUT_ANYRES,
    LAYOUT_SINGLE,
    LAYOUT_VIDEO,
    default_grid_pinpoints,
    num_image_tokens,
)
from llada_v.image_processing_llada_v import LladaVImageProcessor, load_image, sample_frame_indices

from helpers import TricklingHost
from paths import GOLDEN

needs_golden = pytest.mark.skipif(
    not (GOLDEN / "cases.json").is_file(),
    reason=f"golden fixtures not found at {GOLDEN} (set LLADA_V_SHARED to the shared/ folder)",
)


def _cases() -> dict:
    if not (GOLDEN / "cases.json").is_file():
        return {"image_processing": [], "image_processing_variants": [], "video_processing": [], "forward": []}
    return json.loads((GOLDEN / "cases.json").read_text())


CASES = _cases()


def _sha(crop: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(crop, dtype="<f4").tobytes()).hexdigest()


@pytest.fixture(scope="module")
def processor384() -> LladaVImageProcessor:
    return LladaVImageProcessor()


@pytest.fixture(scope="module")
def tiny() -> LladaVImageProcessor:
    # 28 px crops, 2 patches per side: the same code paths at a fraction of the cost.
    return LladaVImageProcessor(crop_size=28, patch_size=14)


def _gradient(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(array, mode="RGB").convert(mode)


# ---------------------------------------------------------------------- golden parity


@needs_golden
@pytest.mark.parametrize("case", CASES["image_processing"], ids=lambda c: c["id"])
def test_golden_anyres_crops_are_bit_exact(processor384, case):
    out = processor384(images=Image.open(GOLDEN / case["image"]), return_tensors="np")
    pixel_values = out["pixel_values"]
    assert pixel_values.dtype == np.float32
    assert pixel_values.shape == tuple(case["pixel_values_shape"][1:])
    assert [_sha(crop) for crop in pixel_values] == [crop["sha256"] for crop in case["crops"]]
    assert out["image_sizes"].tolist() == [case["image_size_hw"]]
    assert out["image_layouts"].tolist() == [LAYOUT_ANYRES]
    assert out["image_num_crops"].tolist() == [case["num_crops"]]
    assert out["num_image_tokens"] == [case["num_image_tokens"]]


@needs_golden
@pytest.mark.parametrize("case", CASES["image_processing_variants"], ids=lambda c: c["id"])
def test_golden_multi_image_pad_crops_are_bit_exact(processor384, case):
    assert case["processing_path"] == "pad"
    image = Image.open(GOLDEN / case["image"])
    out = processor384.preprocess_items([(LAYOUT_SINGLE, image)], return_tensors="np")
    assert [_sha(crop) for crop in out["pixel_values"]] == [crop["sha256"] for crop in case["crops"]]
    assert out["num_image_tokens"] == [case["num_image_tokens_list_path"]] == [730]
    assert out["image_sizes"].tolist() == [case["image_size_hw"]]


@needs_golden
def test_golden_two_images_in_one_prompt_use_the_pad_layout(processor384):
    cases = CASES["image_processing_variants"]
    images = [Image.open(GOLDEN / case["image"]) for case in cases]
    out = processor384(images=images, return_tensors="np")  # a flat list is one prompt
    assert out["image_layouts"].tolist() == [LAYOUT_SINGLE] * len(cases)
    assert [_sha(crop) for crop in out["pixel_values"]] == [case["crops"][0]["sha256"] for case in cases]


@needs_golden
@pytest.mark.parametrize("case", CASES["video_processing"], ids=lambda c: c["id"])
def test_golden_video_frames_are_bit_exact(processor384, case):
    # The official path received decoded frames as uint8 HWC arrays.
    frames = [np.asarray(Image.open(GOLDEN / path)) for path in case["frames"]]
    out = processor384(videos=[frames], return_tensors="np")
    assert out["pixel_values"].shape == tuple(case["pixel_values_shape"])
    assert [_sha(crop) for crop in out["pixel_values"]] == [crop["sha256"] for crop in case["crops"]]
    assert out["image_layouts"].tolist() == [LAYOUT_VIDEO]
    assert out["num_image_tokens"] == [210 * len(frames)]
    width, height = case["frame_size_wh"]
    assert out["image_sizes"].tolist() == [[height, width]]
    # The same frames as PIL images, as a (T, H, W, C) array and as a (T, C, H, W) tensor give the same crops.
    stacked = np.stack(frames)
    for video in ([Image.fromarray(f) for f in frames], stacked, torch.from_numpy(stacked).permute(0, 3, 1, 2)):
        again = processor384(videos=video, return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(again, out["pixel_values"])


@needs_golden
def test_golden_full_tensors_match(processor384):
    from safetensors.numpy import load_file

    wide = load_file(str(GOLDEN / "tensors/pixels_wide_300x100.safetensors"))["pixel_values"][0]
    out = processor384(images=Image.open(GOLDEN / "images/wide_300x100.png"), return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], wide)

    tall = load_file(str(GOLDEN / "tensors/pixels_tall_500x700.safetensors"))
    expected = tall["lut_f32"][tall["pixel_codes_u8"].astype(np.int64)][0]
    out = processor384(images=Image.open(GOLDEN / "images/tall_500x700.png"), return_tensors="np")
    np.testing.assert_array_equal(out["pixel_values"], expected)


@needs_golden
def test_golden_forward_token_counts(processor384):
    for case in CASES["forward"]:
        if case.get("images"):
            images = [Image.open(GOLDEN / path) for path in case["images"]]
            out = processor384(images=images)
        elif case.get("video_frames"):
            out = processor384(videos=[[Image.open(GOLDEN / path) for path in case["video_frames"]]])
        else:
            continue
        assert out["num_image_tokens"] == case["image_tokens_per_placeholder"], case["id"]


def test_spec_token_count_examples(processor384):
    # SPEC section 4 (W x H -> tokens), counted from the processor's layout settings.
    examples = {
        (300, 100): 981,
        (384, 384): 1485,
        (640, 480): 2929,
        (500, 700): 2835,
        (853, 1280): 3633,
        (1920, 1080): 3649,
        (3000, 3000): 3699,
        (1000, 600): 3640,
        (2000, 300): 3627,
        (300, 2000): 3743,
    }
    for (width, height), tokens in examples.items():
        assert processor384.get_num_image_tokens(LAYOUT_ANYRES, (height, width)) == tokens, (width, height)
    assert processor384.get_num_image_tokens(LAYOUT_SINGLE) == 730
    assert processor384.get_num_image_tokens(LAYOUT_VIDEO, num_frames=3) == 630


# ---------------------------------------------------------------------- output contract and layouts


def test_output_contract(tiny):
    out = tiny(images=_gradient(50, 30))
    assert set(out.keys()) == {"pixel_values", "image_sizes", "image_layouts", "image_num_crops", "num_image_tokens"}
    assert out["pixel_values"].dtype == torch.float32 and out["pixel_values"].shape[1:] == (3, 28, 28)
    for key in ("image_sizes", "image_layouts", "image_num_crops"):
        assert out[key].dtype == torch.int64
    assert out["image_sizes"].tolist() == [[30, 50]]
    assert out["image_num_crops"].sum().item() == out["pixel_values"].shape[0]
    assert isinstance(out["num_image_tokens"], list) and all(isinstance(n, int) for n in out["num_image_tokens"])
    assert out["pixel_values"].min() >= -1.0 and out["pixel_values"].max() <= 1.0


def test_layout_depends_on_images_per_prompt(tiny):
    a, b, c = _gradient(50, 30, seed=1), _gradient(20, 60, seed=2), _gradient(33, 33, seed=3)
    assert tiny(images=a)["image_layouts"].tolist() == [LAYOUT_ANYRES]
    assert tiny(images=[a, b])["image_layouts"].tolist() == [LAYOUT_SINGLE] * 2
    nested = tiny(images=[[a], [b, c]])
    assert nested["image_layouts"].tolist() == [LAYOUT_ANYRES, LAYOUT_SINGLE, LAYOUT_SINGLE]
    assert nested["image_num_crops"].tolist()[1:] == [1, 1]
    assert nested["num_image_tokens"][1:] == [5, 5]  # 2x2 patches + one newline


def test_crops_are_concatenated_in_item_order(tiny):
    a, b = _gradient(50, 30, seed=1), _gradient(20, 60, seed=2)
    video = [_gradient(16, 12, seed=s) for s in range(3)]
    items = [(LAYOUT_VIDEO, video), (LAYOUT_ANYRES, a), (LAYOUT_SINGLE, b)]
    together = tiny.preprocess_items(items)
    parts = [tiny.preprocess_items([item]) for item in items]
    expected = torch.cat([p["pixel_values"] for p in parts])
    torch.testing.assert_close(together["pixel_values"], expected, rtol=0, atol=0)
    assert together["num_image_tokens"] == [p["num_image_tokens"][0] for p in parts]
    assert together["image_layouts"].tolist() == [LAYOUT_VIDEO, LAYOUT_ANYRES, LAYOUT_SINGLE]


def test_anyres_tiles_follow_the_padded_canvas(tiny):
    # A wide 112x20 image: best pinpoint is 28x112 (1 row, 4 cols); the image keeps its size (scale 1) and is
    # pasted at y = (28 - 20) // 2 = 4 on a black canvas.
    image = Image.new("RGB", (112, 20), (255, 0, 0))
    out = tiny(images=image)
    assert out["image_num_crops"].tolist() == [5]
    tiles = out["pixel_values"][1:]
    red = torch.tensor([[1.0], [-1.0], [-1.0]])
    for tile in tiles:
        assert torch.equal(tile[:, 4:24, :].reshape(3, -1).unique(dim=1), red)
    assert torch.all(tiles[:, :, :4, :] == -1.0) and torch.all(tiles[:, :, 24:, :] == -1.0)
    # The base crop is the whole image squashed: all red, no letterbox.
    assert torch.equal(out["pixel_values"][0].reshape(3, -1).unique(dim=1), red)


def test_numpy_torch_and_pil_inputs_agree(tiny):
    image = _gradient(45, 31)
    array = np.asarray(image)
    reference = tiny(images=image)["pixel_values"]
    chw = np.ascontiguousarray(array.transpose(2, 0, 1))
    for same in (array, chw, torch.from_numpy(chw.copy()), array.astype(np.float32) / 255.0):
        torch.testing.assert_close(tiny(images=same)["pixel_values"], reference, rtol=0, atol=0)
    gray = np.asarray(image.convert("L"))
    torch.testing.assert_close(
        tiny(images=gray)["pixel_values"], tiny(images=image.convert("L"))["pixel_values"], rtol=0, atol=0
    )


def test_file_path_and_bytes_inputs(tiny, tmp_path):
    image = _gradient(40, 25)
    path = tmp_path / "img.png"
    image.save(path)
    reference = tiny(images=image)["pixel_values"]
    torch.testing.assert_close(tiny(images=str(path))["pixel_values"], reference, rtol=0, atol=0)
    torch.testing.assert_close(tiny(images=path)["pixel_values"], reference, rtol=0, atol=0)
    torch.testing.assert_close(tiny(images=path.read_bytes())["pixel_values"], reference, rtol=0, atol=0)


def test_return_tensors_np(tiny):
    out = tiny(images=_gradient(30, 30), return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["image_sizes"].dtype == np.int64
    with pytest.raises(ValueError, match="return_tensors"):
        tiny(images=_gradient(30, 30), return_tensors="tf")


def test_video_sampling_keeps_at_most_max_frames():
    assert sample_frame_indices(5, 32) == [0, 1, 2, 3, 4]
    indices = sample_frame_indices(100, 32)
    assert len(indices) == 32 and indices[0] == 0 and indices[-1] == 99
    assert indices == np.linspace(0, 99, 32, dtype=int).tolist()
    processor = LladaVImageProcessor(crop_size=28, patch_size=14, max_frames=4)
    frames = np.stack([np.full((10, 12, 3), i, dtype=np.uint8) for i in range(10)])
    out = processor(videos=frames)
    assert out["image_num_crops"].tolist() == [4] and out["num_image_tokens"] == [4 * 1 * 2]
    kept = ((out["pixel_values"][:, 0, 0, 0] + 1) / 2 * 255).round().tolist()
    assert kept == [0.0, 3.0, 6.0, 9.0]


def test_several_videos(tiny):
    video_a = [_gradient(16, 12, seed=s) for s in range(2)]
    video_b = np.zeros((3, 12, 16, 3), dtype=np.uint8)
    out = tiny(videos=[video_a, video_b])
    assert out["image_layouts"].tolist() == [LAYOUT_VIDEO, LAYOUT_VIDEO]
    assert out["image_num_crops"].tolist() == [2, 3]


# ---------------------------------------------------------------------- settings


def test_from_model_config_copies_layout_settings():
    config = LladaVConfig()
    processor = LladaVImageProcessor.from_model_config(config)
    assert processor.layout_kwargs() == config.layout_kwargs()
    assert processor.crop_size == 384 and processor.patches_per_side == 27
    tiny_config = LladaVConfig(vision_config={"image_size": 28, "patch_size": 14}, max_num_tiles=2)
    tiny_processor = LladaVImageProcessor.from_model_config(tiny_config, max_frames=8)
    assert tiny_processor.layout_kwargs() == tiny_config.layout_kwargs()
    assert tiny_processor.max_frames == 8
    assert tiny_processor.image_grid_pinpoints == default_grid_pinpoints(28)


def test_defaults_match_the_released_model():
    processor = LladaVImageProcessor()
    assert processor.image_grid_pinpoints == LladaVConfig().image_grid_pinpoints
    assert (processor.max_num_tiles, processor.anyres_pool_threshold, processor.video_pool_stride) == (4, 1.1, 2)
    assert processor.max_frames == 32 and processor.pad_color == (127, 127, 127)
    assert processor.rescale_factor == 1 / 255 and processor.image_mean == processor.image_std == [0.5] * 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crop_size": 0}, "crop_size must be a positive integer, got 0"),
        ({"patch_size": 30, "crop_size": 28}, r"patch_size \(30\) must not exceed crop_size \(28\)"),
        ({"max_frames": -1}, "max_frames must be a positive integer, got -1"),
        ({"max_num_tiles": 2.5}, "max_num_tiles must be a positive integer, got 2.5"),
        ({"image_grid_pinpoints": [[384, 500]]}, r"positive multiples of crop_size \(384\), got \[384, 500\]"),
        ({"image_grid_pinpoints": []}, "image_grid_pinpoints must be a non-empty list"),
        ({"anyres_pool_threshold": 0}, "anyres_pool_threshold must be a positive number, got 0"),
        ({"image_std": [0.5, 0, 0.5]}, "image_std must not contain 0"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean must hold 3 numbers"),
        ({"rescale_factor": -1.0}, "rescale_factor must be a positive number, got -1.0"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LladaVImageProcessor(**kwargs)


def test_save_and_load_round_trip(tmp_path):
    processor = LladaVImageProcessor(crop_size=28, patch_size=14, max_frames=7, max_num_tiles=2)
    processor.save_pretrained(tmp_path)
    loaded = LladaVImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.layout_kwargs() == processor.layout_kwargs() and loaded.max_frames == 7
    assert LladaVImageProcessor.from_pretrained(tmp_path, max_frames=3).max_frames == 3
    image = _gradient(70, 20)
    torch.testing.assert_close(loaded(images=image)["pixel_values"], processor(images=image)["pixel_values"])
    # A hand-edited config is validated on load.
    config_file = tmp_path / "preprocessor_config.json"
    bad = json.loads(config_file.read_text())
    bad["crop_size"] = -3
    config_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="crop_size must be a positive integer, got -3"):
        LladaVImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------- bad inputs


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_corrupt_file_raises(tiny, tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match="cannot identify .*corrupt.png"):
        tiny(images=str(path))


def test_truncated_file_raises(tiny, tmp_path):
    data = _png_bytes(_gradient(64, 64))
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        tiny(images=str(path))
    with pytest.raises(ValueError, match="could not decode"):
        tiny(images=Image.open(path))  # lazily opened PIL image


def test_missing_file_raises(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tiny(images=str(tmp_path / "nope.png"))


def test_zero_sized_images_raise(tiny):
    with pytest.raises(ValueError, match=r"zero size \(height=10, width=0\)"):
        tiny(images=Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="zero size"):
        tiny(images=np.zeros((0, 5, 3), dtype=np.uint8))


def test_one_pixel_image(tiny, processor384):
    out = tiny(images=Image.new("RGB", (1, 1), (255, 255, 255)))
    assert out["image_sizes"].tolist() == [[1, 1]] and out["image_num_crops"].tolist() == [2]
    assert torch.all(out["pixel_values"] == 1.0)
    assert processor384.get_num_image_tokens(LAYOUT_ANYRES, (1, 1)) == 729 + 27 * 28


def test_cmyk_is_converted_to_rgb_first(tiny):
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))
    rgb = cmyk.convert("RGB")
    torch.testing.assert_close(tiny(images=cmyk)["pixel_values"], tiny(images=rgb)["pixel_values"], rtol=0, atol=0)


def test_la_behaves_like_l_when_opaque_and_black_where_transparent(tiny):
    gray = _gradient(40, 30).convert("L")
    opaque = gray.convert("LA")
    torch.testing.assert_close(tiny(images=opaque)["pixel_values"], tiny(images=gray)["pixel_values"], rtol=0, atol=0)
    transparent = Image.new("LA", (40, 30), (255, 0))
    assert torch.all(tiny(images=transparent)["pixel_values"] == -1.0)


def test_rgba_transparent_areas_become_black_in_anyres_and_keep_colour_in_pad(tiny):
    rgba = Image.new("RGBA", (40, 30), (255, 255, 255, 0))  # invisible white
    rgba.paste((10, 200, 30, 255), (0, 0, 20, 30))
    anyres = tiny(images=rgba)["pixel_values"]
    assert anyres[0, :, 5, 25].tolist() == [-1.0, -1.0, -1.0]  # transparent half: black
    # Away from the edge the result equals the image composited on black; at the edge the premultiplied resize
    # keeps the colour of partly covered pixels instead of blending it with black.
    on_black = Image.new("RGB", (40, 30), (0, 0, 0))
    on_black.paste((10, 200, 30), (0, 0, 20, 30))
    reference = tiny(images=on_black)["pixel_values"]
    for columns in (slice(0, 11), slice(18, 28)):
        torch.testing.assert_close(anyres[0, :, :, columns], reference[0, :, :, columns], rtol=0, atol=0)
    # Multi-image pad path (official order: convert to RGB, then pad and resize): the stored colour shows.
    padded = tiny(images=[rgba, rgba])["pixel_values"]
    assert padded[0, :, 14, 25].tolist() == [1.0, 1.0, 1.0]


def test_palette_with_transparency_goes_through_rgba(tiny):
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 20, 30))
    palette.info["transparency"] = 0
    assert load_image(palette).mode == "RGBA"
    out = tiny(images=palette)["pixel_values"]
    assert out[0, :, 5, 25].tolist() == [-1.0, -1.0, -1.0]
    del palette.info["transparency"]
    assert load_image(palette).mode == "RGB"
    torch.testing.assert_close(
        tiny(images=palette)["pixel_values"], tiny(images=palette.convert("RGB"))["pixel_values"], rtol=0, atol=0
    )


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tiny, tmp_path):
    levels = np.array([[0, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)  # 32896 * 255 / 65535 = 128
    image = Image.fromarray(levels)
    if image.mode != "I;16":
        image = image.convert("I;16")
    path = tmp_path / "sixteen.png"
    image.save(path)
    for source in (image, str(path), levels):
        converted = load_image(source)
        assert converted.mode == "L"
        assert np.asarray(converted)[0].tolist() == [0, 128, 255]
    out = tiny(images=Image.open(path))
    assert out["pixel_values"].shape == (2, 3, 28, 28)


def test_exif_orientation_is_applied(tiny):
    upright = _gradient(20, 40)  # portrait, (height 40, width 20)
    rotated = upright.transpose(Image.Transpose.ROTATE_90)  # stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", quality=95, exif=exif)
    data = buffer.getvalue()
    out = tiny(images=data)
    assert out["image_sizes"].tolist() == [[40, 20]]
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert expected.size == (20, 40)
    reference = tiny(images=expected.convert("RGB"))["pixel_values"]
    torch.testing.assert_close(out["pixel_values"], reference, rtol=0, atol=0)
    # Without an orientation tag nothing changes.
    plain = io.BytesIO()
    rotated.save(plain, format="JPEG", quality=95)
    assert tiny(images=plain.getvalue())["image_sizes"].tolist() == [[20, 40]]


def test_one_pixel_limit_for_every_source(tmp_path, monkeypatch):
    image = _gradient(20, 20)  # 400 pixels
    path = tmp_path / "big.png"
    image.save(path)
    sources = {"path": str(path), "bytes": path.read_bytes(), "PIL": image, "array": np.asarray(image)}
    limited = LladaVImageProcessor(crop_size=28, max_image_pixels=300)
    for kind, source in sources.items():
        with pytest.raises(ValueError, match="more than the limit 300"):
            limited(images=source)
    # The default limit is Pillow's, in its warning zone (1x..2x) too, and beyond it (Pillow's own error).
    default = LladaVImageProcessor(crop_size=28)
    for pillow_limit in (300, 100):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
        for kind, source in sources.items():
            with pytest.raises(ValueError, match=f"than the limit {pillow_limit}"):
                default(images=source)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
        assert default(images=str(path))["image_sizes"].tolist() == [[20, 20]]
    assert LladaVImageProcessor(crop_size=28, max_image_pixels=400)(images=image)["image_sizes"].tolist() == [[20, 20]]


def test_video_with_zero_frames_raises(tiny):
    with pytest.raises(ValueError, match="at least one frame, got 0"):
        tiny(videos=[])
    with pytest.raises(ValueError, match="at least one frame, got 0"):
        tiny(videos=np.zeros((0, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="at least one frame"):
        tiny.preprocess_items([(LAYOUT_VIDEO, [])])


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (42, TypeError, "unsupported image type int"),
        ({"image": 1}, TypeError, "unsupported image type dict"),
        (np.zeros((4, 4, 3), dtype=np.float32) + 2.0, ValueError, r"values in \[0, 1\]"),
        (np.full((4, 4), np.nan, dtype=np.float32), ValueError, "NaN"),
        (np.zeros((4, 4, 3), dtype=np.int32) + 300, ValueError, r"\[0, 255\]"),
        (np.zeros((5, 6, 7), dtype=np.uint8), ValueError, "channel axis"),
        (np.zeros((2, 2, 2, 2, 2), dtype=np.uint8), ValueError, "2 or 3 dimensions"),
        (np.zeros((4, 4, 3), dtype=np.complex64), TypeError, "dtype complex64"),
    ],
)
def test_unsupported_inputs_raise(tiny, bad, error, message):
    with pytest.raises(error, match=message):
        tiny.preprocess_items([(LAYOUT_ANYRES, bad)])


def test_bad_calls_raise(tiny):
    with pytest.raises(ValueError, match="needs `images` or `videos`"):
        tiny()
    with pytest.raises(ValueError, match="unknown image layout 7"):
        tiny.preprocess_items([(7, _gradient(10, 10))])
    with pytest.raises(TypeError, match="decode video files into frames first"):
        tiny(videos="movie.mp4")
    with pytest.raises(TypeError, match="movie.mp4 looks like a video file"):
        tiny(videos=["movie.mp4"])
    with pytest.raises(ValueError, match="empty list of images"):
        tiny(images=[])


# ---------------------------------------------------------------------- fuzz


def _official_token_count(width: int, height: int, crop: int, patches: int, max_tiles: int, threshold: float) -> int:
    """Official LLaDA-V packing, re-derived in its own (width, height) conventions with an index grid."""
    pinpoints_wh = [(crop * i, crop * j) for i in range(1, 7) for j in range(1, 7)]
    best, best_effective, best_wasted = None, 0, float("inf")
    for cand_w, cand_h in pinpoints_wh:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_w, cand_h), effective, wasted
    cols, rows = best[0] // crop, best[1] // crop
    grid = np.zeros((rows * patches, cols * patches))  # (H', W') feature grid of the tiles
    cur_h, cur_w = grid.shape
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        grid = grid[pad : cur_h - pad, :]
    else:
        new_w = int(width * (cur_h / height))
        pad = (cur_w - new_w) // 2
        grid = grid[:, pad : cur_w - pad]
    h, w = grid.shape
    times = math.sqrt(h * w / (max_tiles * patches * patches))
    if times > threshold:
        h, w = int(h // times), int(w // times)
    return patches * patches + h * (w + 1)


@settings(max_examples=300, deadline=None)
@example(width=8000, height=1)
@example(width=1, height=8000)
@example(width=1, height=1)
@given(width=st.integers(1, 8000), height=st.integers(1, 8000))
def test_fuzz_token_count_matches_official_packing(width, height):
    kwargs = LladaVConfig().layout_kwargs()
    assert num_image_tokens(LAYOUT_ANYRES, (height, width), **kwargs) == _official_token_count(
        width, height, 384, 27, 4, 1.1
    )


_FUZZ_PROCESSOR = LladaVImageProcessor(crop_size=28, patch_size=14)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(width=8000, height=1500, layout=LAYOUT_ANYRES)
@example(width=8000, height=1, layout=LAYOUT_ANYRES)
@example(width=1, height=8000, layout=LAYOUT_ANYRES)
@example(width=1, height=1, layout=LAYOUT_ANYRES)
@example(width=1, height=8000, layout=LAYOUT_SINGLE)
@given(
    width=st.integers(1, 8000),
    height=st.integers(1, 8000),
    layout=st.sampled_from([LAYOUT_ANYRES, LAYOUT_SINGLE]),
)
def test_fuzz_sizes_and_aspect_ratios(width, height, layout):
    # Constant-colour L images keep 8000 px sides affordable; the area is capped to bound the test's run time.
    if width * height > 12_000_000:
        height = max(1, 12_000_000 // width)
    processor = _FUZZ_PROCESSOR
    out = processor.preprocess_items([(layout, Image.new("L", (width, height), 200))])
    pixel_values = out["pixel_values"]
    assert pixel_values.shape[1:] == (3, 28, 28) and pixel_values.dtype == torch.float32
    assert out["image_sizes"].tolist() == [[height, width]]
    assert out["image_num_crops"].tolist() == [pixel_values.shape[0]]
    expected_tokens = processor.get_num_image_tokens(layout, (height, width))
    assert out["num_image_tokens"] == [expected_tokens]
    if layout == LAYOUT_ANYRES:
        assert expected_tokens == _official_token_count(width, height, 28, 2, 4, 1.1)
        rows, cols = (size // 28 for size in _best_hw(processor, height, width))
        assert pixel_values.shape[0] == 1 + rows * cols
    else:
        assert pixel_values.shape[0] == 1 and expected_tokens == 2 * 2 + 1


_FUZZ_PROCESSOR_384 = LladaVImageProcessor()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(width=3000, height=3000)
@given(width=st.integers(1, 8000), height=st.integers(1, 8000))
def test_fuzz_released_crop_size(width, height):
    # The released settings: every crop is 384x384 and the crop count matches the best grid pinpoint.
    height = min(height, max(1, 6_000_000 // width))
    out = _FUZZ_PROCESSOR_384(images=Image.new("L", (width, height), 90))
    assert out["pixel_values"].shape[1:] == (3, 384, 384)
    assert out["image_sizes"].tolist() == [[height, width]]
    rows, cols = (size // 384 for size in _best_hw(_FUZZ_PROCESSOR_384, height, width))
    assert out["image_num_crops"].tolist() == [1 + rows * cols] == [out["pixel_values"].shape[0]]
    assert out["num_image_tokens"] == [_official_token_count(width, height, 384, 27, 4, 1.1)]


def _best_hw(processor, height, width):
    from llada_v.image_layout_llada_v import select_best_resolution

    return select_best_resolution((height, width), processor.image_grid_pinpoints)


# ---------------------------------------------------------------------------------------------- URLs


class _Server:
    """A real HTTP server on 127.0.0.1 in a thread: `/ok.png` serves `body`, `/big.png` more bytes than a limit,
    anything else is a 404. Bounded: it stops with the test."""

    def __init__(self, body: bytes):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server hook
                payload = {"/ok.png": body, "/big.png": b"\0" * 5000}.get(self.path)
                if payload is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_url_gives_the_pixels_of_the_same_file_by_path(tiny, tmp_path):
    image = Image.new("RGBA", (30, 20), (200, 30, 90, 255))
    image.paste((10, 240, 20, 0), (0, 0, 15, 20))  # half transparent: mode handling matters
    path = tmp_path / "rgba.png"
    image.save(path)
    server = _Server(path.read_bytes())
    try:
        by_url = tiny(images=f"{server.url}/ok.png")["pixel_values"]
    finally:
        server.close()
    torch.testing.assert_close(by_url, tiny(images=str(path))["pixel_values"], rtol=0, atol=0)


def test_url_errors_name_the_url_and_respect_the_limits(tmp_path):
    server = _Server(b"")
    try:
        with pytest.raises(ValueError, match=rf"cannot fetch {server.url}/missing.png: HTTP 404"):
            load_image(f"{server.url}/missing.png")
        with pytest.raises(ValueError, match=rf"{server.url}/big.png is 5000 bytes, more than the limit of 100"):
            load_image(f"{server.url}/big.png", max_url_bytes=100)
        with pytest.raises(ValueError, match=rf"cannot identify {server.url}/ok.png as an image"):
            load_image(f"{server.url}/ok.png")  # an empty body
    finally:
        server.close()


def test_a_url_that_never_answers_times_out():
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts the connection (backlog) and never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.png"
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match=rf"cannot fetch {url}: no answer within 0.5 s"):
            load_image(url, url_timeout=0.5)
    finally:
        silent.close()
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------------------------- other inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_image_tensors_are_accepted(tiny, dtype):
    levels = torch.arange(0, 256, 17, dtype=torch.float32) / 255  # exactly representable in both dtypes
    tensor = levels.repeat(3, 16, 1)[:, :, :16]  # (3, 16, 16) in [0, 1]
    expected = tiny(images=tensor)["pixel_values"]
    torch.testing.assert_close(tiny(images=tensor.to(dtype))["pixel_values"], expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_the_resizer_equals_pillow_12_bicubic(mode):
    # Whatever Pillow is installed, the image processor resizes with its own code (Pillow 13 changed bicubic);
    # the golden pixel tests pin it to the official pixels. Where Pillow < 13 is installed, compare directly.
    import PIL

    from llada_v.image_resize_llada_v import resize_bicubic

    if int(PIL.__version__.split(".")[0]) >= 13:
        pytest.skip(f"Pillow {PIL.__version__} resizes differently; the golden pixel tests cover this environment")
    rng = np.random.default_rng(len(mode))
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    for _ in range(40):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 200, size=4))
        pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        if channels in (2, 4):
            pixels[..., -1][rng.random((h, w)) < 0.3] = 0
            pixels[..., -1][rng.random((h, w)) < 0.3] = 255
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
        expected = np.asarray(image.resize((ow, oh), Image.Resampling.BICUBIC)).reshape(oh, ow, channels)
        got = resize_bicubic(pixels, (oh, ow), has_alpha=mode in ("LA", "RGBA"))
        assert np.array_equal(got, expected), (mode, (h, w), (oh, ow))


# ---------------------------------------------------------------------------------------------- memory bounds


def test_a_thin_image_is_refused_before_its_padded_square_is_allocated():
    import tracemalloc

    # Two 1 x 2000 images in one prompt: each is padded to a 2000 x 2000 square (4,000,000 pixels, 12 MB) before
    # the resize. The limit bounds that square, not just the 2000 pixels of the input, and is checked first.
    processor = LladaVImageProcessor(crop_size=28, max_image_pixels=1_000_000)
    thin = Image.new("RGB", (2000, 1), (10, 200, 30))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            processor(images=[thin, thin])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "image 0 of height 1 and width 2000 is padded to a 2000 x 2000 square (4000000 pixels)" in message
    assert "more than the limit 1000000 (max_image_pixels)" in message
    assert peak < 2_000_000, peak  # nothing of the 12 MB square (nor its float64 resize) was made
    # The same image alone (anyres: no square) and thin images whose square fits are processed.
    assert processor(images=thin)["image_sizes"].tolist() == [[1, 2000]]
    small = Image.new("RGB", (1000, 1), (10, 200, 30))
    assert processor(images=[small, small])["pixel_values"].shape == (2, 3, 28, 28)


def test_the_default_limit_bounds_the_square_too(monkeypatch):
    # Without max_image_pixels the limit is Pillow's (89,478,485 unless changed): 1 x 10000 would pad to 10^8.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    thin = Image.new("L", (1, 2000), 255)
    with pytest.raises(ValueError, match=r"2000 x 2000 square \(4000000 pixels\).*more than the limit 1000000"):
        LladaVImageProcessor(crop_size=28)(images=[thin, thin])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's guard switched off: no limit at all
    assert LladaVImageProcessor(crop_size=28)(images=[thin, thin])["pixel_values"].shape == (2, 3, 28, 28)


def test_slices_of_a_resize_pass_give_the_same_pixels(monkeypatch):
    from llada_v import image_resize_llada_v

    rng = np.random.default_rng(0)
    cases = [((97, 61, 3), (384, 384), False), ((300, 40, 4), (23, 384), True), ((50, 700, 2), (384, 11), True)]
    for shape, size, has_alpha in cases:
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        whole = image_resize_llada_v.resize_bicubic(pixels, size, has_alpha)
        monkeypatch.setattr(image_resize_llada_v, "_SLICE_ELEMENTS", 7 * max(shape[0], shape[1], *size))
        sliced = image_resize_llada_v.resize_bicubic(pixels, size, has_alpha)
        monkeypatch.undo()
        assert np.array_equal(sliced, whole), (shape, size)


def test_a_trickling_url_is_cut_off_at_the_deadline():
    import time

    server = TricklingHost(seconds=20)
    try:
        start = time.monotonic()
        with pytest.raises(ValueError, match=rf"{server.url} did not finish downloading within 2 s"):
            load_image(server.url, url_timeout=2)
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert 1.9 < elapsed < 3.5, elapsed  # the whole download, not one read, is bounded
