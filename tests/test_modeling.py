"""Behaviour of LladaVConfig / LladaVModel on tiny configs (no golden data needed)."""

import json

import pytest
import torch

from llada_v import LladaVConfig, LladaVModel
from llada_v.image_layout_llada_v import LAYOUT_SINGLE, LAYOUT_VIDEO, num_image_tokens
from llada_v.modeling_llada_v import conversation_ids_from_input_ids, rope_inv_freq

from paths import SHARED
from tiny import IMAGE_TOKEN, image_prompt, tiny_config, tiny_model

# ---------------------------------------------------------------- config


def test_default_config_is_the_released_model_parameter_count():
    with torch.device("meta"):
        model = LladaVModel(LladaVConfig())
    total = sum(p.numel() for p in model.parameters())
    assert total == 8_434_837_024
    lm = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("language_model.", "lm_head.")))
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vision_tower."))
    projector = sum(p.numel() for n, p in model.named_parameters() if n.startswith("multi_modal_projector."))
    assert (lm, vision, projector, model.image_newline.numel()) == (8_015_581_184, 397_747_744, 21_504_000, 4096)


def test_default_config_matches_reference_llada_config():
    reference = SHARED / "reference" / "llada-8b-instruct" / "config.json"
    if not reference.is_file():
        pytest.skip(f"{reference} not found")
    ref = json.loads(reference.read_text())
    text = LladaVConfig().text_config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "hidden_act",
    ):
        assert getattr(text, key) == ref[key], key
    config = LladaVConfig()
    assert (config.mask_token_id, config.eot_token_id, config.eos_token_id, config.bos_token_id) == (
        126336,
        126348,
        126081,
        126080,
    )
    assert config.vision_config.num_hidden_layers == 26 and config.vision_config.hidden_size == 1152
    assert config.patches_per_side == 27 and len(config.image_grid_pinpoints) == 36
    # (height, width) pairs, width outer as in the official [w, h] order: ties go to the first.
    assert config.image_grid_pinpoints[:2] == [[384, 384], [768, 384]]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(mask_token_id=10**7), "mask_token_id (10000000)"),
        (dict(image_token_id=126336), "image_token_id and mask_token_id must differ"),
        (dict(max_num_tiles=0), "max_num_tiles must be positive, got 0"),
        (dict(image_grid_pinpoints=[[384, 100]]), "[384, 100]"),
        (dict(vision_feature_layer=0), "vision_feature_layer (0)"),
        (dict(tokenizer_vocab_size=200_000), "tokenizer_vocab_size (200000)"),
        (dict(text_config=dict(num_attention_heads=32, num_key_value_heads=5)), "num_key_value_heads (5)"),
        (dict(text_config=dict(hidden_size=0)), "hidden_size must be a positive integer, got 0"),
    ],
)
def test_invalid_config_raises_value_error_naming_values(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        LladaVConfig(**kwargs)
    assert fragment in str(err.value)


def test_config_round_trip(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    again = LladaVConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert again.text_config.eos_token_id == config.eos_token_id


# ---------------------------------------------------------------- forward


def test_forward_shapes_text_and_anyres_image():
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 7))
    assert model(input_ids=ids).logits.shape == (2, 7, 128)
    ids, pixel_values, sizes = image_prompt(model.config)
    out = model(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes)
    assert out.logits.shape == (1, ids.shape[1], 128)
    assert out.logits.dtype == torch.float32


def test_single_crop_and_video_layouts_give_their_token_counts():
    model = tiny_model()
    config = model.config
    feats = model.get_image_features(
        torch.randn(1 + 3, 3, 28, 28),
        image_sizes=torch.tensor([[40, 40], [28, 28]]),
        image_layouts=torch.tensor([LAYOUT_SINGLE, LAYOUT_VIDEO]),
        image_num_crops=torch.tensor([1, 3]),
    )
    single = num_image_tokens(LAYOUT_SINGLE, **config.layout_kwargs())
    video = num_image_tokens(LAYOUT_VIDEO, num_frames=3, **config.layout_kwargs())
    assert [f.shape[0] for f in feats] == [single, video] == [5, 3 * 1 * 2]
    # The last token of every row is the learned newline.
    torch.testing.assert_close(feats[0][-1], model.image_newline)
    torch.testing.assert_close(feats[1][1::2], model.image_newline.expand(3, -1))


def test_anyres_packing_matches_layout_count_for_many_sizes():
    model = tiny_model()
    for size in [(1, 1), (10, 300), (300, 10), (28, 28), (50, 30), (84, 28), (1000, 999)]:
        ids, pixel_values, sizes = image_prompt(model.config, size_hw=size)
        feats = model.get_image_features(pixel_values, sizes)
        assert feats[0].shape[0] == (ids == IMAGE_TOKEN).sum()


def test_feature_token_mismatch_raises():
    model = tiny_model()
    ids, pixel_values, sizes = image_prompt(model.config)
    ids = torch.cat([ids, torch.tensor([[IMAGE_TOKEN]])], dim=1)
    with pytest.raises(ValueError, match=r"tokens: \d+, features \d+"):
        model(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes)


def test_wrong_crop_count_raises():
    model = tiny_model()
    ids, pixel_values, sizes = image_prompt(model.config)
    with pytest.raises(ValueError, match="pixel_values holds"):
        model(input_ids=ids, pixel_values=pixel_values[:-1], image_sizes=sizes)


def test_attention_is_bidirectional():
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 8))
    edited = ids.clone()
    edited[0, 6] = (ids[0, 6] + 1) % 100
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=edited).logits
    # Editing token 6 changes the logits at every earlier position.
    assert all(not torch.allclose(a[0, i], b[0, i]) for i in range(6))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padding_is_invariant(impl):
    model = tiny_model()
    model.set_attn_implementation(impl)
    short, long = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 9))
    pad = model.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 4), pad), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        together = model(input_ids=batch, attention_mask=mask).logits
        alone_short = model(input_ids=short).logits
        alone_long = model(input_ids=long).logits
    torch.testing.assert_close(together[0, 4:], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], alone_long[0], atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=ids).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)


def test_logits_to_keep():
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last3 = model(input_ids=ids, logits_to_keep=3).logits
        picked = model(input_ids=ids, logits_to_keep=torch.tensor([1, 4])).logits
    torch.testing.assert_close(last3, full[:, -3:])
    torch.testing.assert_close(picked, full[:, [1, 4]])


def test_dialogue_causal_attention_hides_later_turns():
    model = tiny_model(dialogue_causal_attention=True)
    cfg = model.config
    h, e = cfg.start_header_token_id, cfg.end_header_token_id
    user, asst = cfg.user_role_token_id, cfg.assistant_role_token_id
    ids = torch.tensor([[cfg.bos_token_id, h, user, e, 7, 8, h, asst, e, 9, 10, h, user, e, 11, h, asst, e, 12, 13]])
    conv = conversation_ids_from_input_ids(ids, cfg)
    assert conv.tolist() == [[0] * 11 + [1] * 9]
    edited = ids.clone()
    edited[0, 18] = 40  # a token of turn 1
    with torch.no_grad():
        a = model(input_ids=ids, conversation_ids=conv).logits
        b = model(input_ids=edited, conversation_ids=conv).logits
    torch.testing.assert_close(a[0, :11], b[0, :11])  # turn 0 cannot see turn 1
    assert not torch.allclose(a[0, 11:18], b[0, 11:18])


def test_dialogue_turns_come_from_the_clean_ids_when_headers_are_masked():
    # The training forward masks supervised tokens, headers included; the turn boundaries must not move.
    model = tiny_model(dialogue_causal_attention=True).train()
    cfg = model.config
    h, e = cfg.start_header_token_id, cfg.end_header_token_id
    user, asst = cfg.user_role_token_id, cfg.assistant_role_token_id
    ids = torch.tensor([[cfg.bos_token_id, h, user, e, 7, 8, h, asst, e, 9, 10, h, user, e, 11, h, asst, e, 12, 13]])
    labels = ids.clone()
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, 11] = True  # the second user header
    t = torch.tensor([0.5])
    with torch.no_grad():
        derived = model(input_ids=ids, labels=labels, masking_t=t, masked_indices=masked).loss
        given = model(input_ids=ids, labels=labels, masking_t=t, masked_indices=masked,
                      conversation_ids=conversation_ids_from_input_ids(ids, cfg)).loss  # fmt: skip
        masked_ids = ids.masked_fill(masked, cfg.mask_token_id)
        wrong = model(input_ids=ids, labels=labels, masking_t=t, masked_indices=masked,
                      conversation_ids=conversation_ids_from_input_ids(masked_ids, cfg)).loss  # fmt: skip
    assert torch.equal(derived, given) and not torch.equal(derived, wrong)


# ---------------------------------------------------------------- loss


def _labels(ids):
    labels = ids.clone()
    labels[:, :3] = -100
    labels[ids == IMAGE_TOKEN] = -100
    return labels


def test_loss_with_explicit_t_and_mask_follows_the_official_formula():
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 10))
    labels = _labels(ids)
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, [3, 5]] = True
    masked[1, [9]] = True
    t = torch.tensor([0.25, 0.5])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, masking_t=t, masked_indices=masked)
        noisy = ids.masked_fill(masked, model.config.mask_token_id)
        logits = model(input_ids=noisy).logits
    p_mask = (1 - 1e-3) * t + 1e-3
    ce = torch.nn.functional.cross_entropy(logits[masked], labels[masked], reduction="none")
    rows = masked.nonzero()[:, 0]
    expected = (ce / p_mask[rows] / 7).sum() / 2  # 7 supervised positions per row
    torch.testing.assert_close(out.loss, expected)
    assert out.logits is None  # a training forward does not materialise full logits


def test_loss_draws_t_then_uniforms_from_torch_rng():
    model = tiny_model()
    ids = torch.randint(0, 100, (2, 10))
    labels = _labels(ids)
    torch.manual_seed(5)
    out = model(input_ids=ids, labels=labels)
    torch.manual_seed(5)
    t = torch.rand(2)
    draws = torch.rand(2, 10)
    p_mask = (1 - 1e-3) * t + 1e-3
    assert torch.equal(out.masked_indices, (draws < p_mask[:, None]) & (labels != -100))
    torch.testing.assert_close(out.p_mask, p_mask)


def test_bad_loss_inputs_raise():
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 6))
    labels = _labels(ids)
    with pytest.raises(ValueError, match="masked_indices needs masking_t"):
        model(input_ids=ids, labels=labels, masked_indices=torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="label is -100"):
        model(input_ids=ids, labels=labels, masking_t=torch.tensor([0.5]), masked_indices=torch.ones_like(ids).bool())
    with pytest.raises(ValueError, match=r"masking_t must lie in \[0, 1\]"):
        model(input_ids=ids, labels=labels, masking_t=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="labels shape"):
        model(input_ids=ids, labels=labels[:, :3])


# ---------------------------------------------------------------- save / load


def test_two_loads_give_identical_logits_and_rope_is_refilled(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    ids = torch.randint(0, 100, (1, 12))
    outs = []
    for _ in range(2):
        model = LladaVModel.from_pretrained(tmp_path).eval()
        expected = rope_inv_freq(model.config.text_config)
        assert torch.equal(model.language_model.rotary_emb.inv_freq, expected)
        with torch.no_grad():
            outs.append(model(input_ids=ids).logits)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- diffusion cache


def test_cache_window_equals_full_forward_when_nothing_changed():
    from llada_v.generation_utils import LladaVDiffusionCache

    model = tiny_model()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cache = LladaVDiffusionCache(model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, cache=cache).logits
        window = model(input_ids=ids[:, 6:9], attention_mask=mask, cache=cache, cache_start=6).logits
    torch.testing.assert_close(window, full[:, 6:9], atol=1e-5, rtol=1e-5)


def test_cache_is_exact_for_a_one_layer_model_after_editing_the_window():
    # With one layer the cached keys/values depend only on the unchanged tokens' embeddings, so a window
    # recomputed after editing tokens inside it must equal a full forward on the edited sequence.
    from llada_v.generation_utils import LladaVDiffusionCache

    model = tiny_model(
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    )
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 100, (1, 10))
    edited = ids.clone()
    edited[0, 5:7] = model.config.mask_token_id
    cache = LladaVDiffusionCache(1)
    with torch.no_grad():
        model(input_ids=ids, cache=cache)
        window = model(input_ids=edited[:, 4:8], cache=cache, cache_start=4).logits
        full = model(input_ids=edited).logits
    torch.testing.assert_close(window, full[:, 4:8], atol=1e-5, rtol=1e-5)


def test_cache_rejects_bad_windows():
    from llada_v.generation_utils import LladaVDiffusionCache

    model = tiny_model()
    ids = torch.randint(0, 100, (1, 8))
    cache = LladaVDiffusionCache(model.config.text_config.num_hidden_layers)
    with pytest.raises(ValueError, match="must start at 0"):
        model(input_ids=ids[:, 2:4], cache=cache, cache_start=2)
    model(input_ids=ids, cache=cache)
    with pytest.raises(ValueError, match=r"window \[6, 10\)"):
        model(input_ids=ids[:, :4], cache=cache, cache_start=6)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(input_ids=ids, labels=ids, cache=cache)


# ---------------------------------------------------------------- processor <-> model agreement


def test_processor_token_count_equals_model_feature_count_fuzzed():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from PIL import Image

    from llada_v import LladaVImageProcessor

    model = tiny_model()
    image_processor = LladaVImageProcessor.from_model_config(model.config)

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(width=st.integers(1, 8000), height=st.integers(1, 8000))
    def check(width, height):
        if width * height > 16_000_000:  # keep each example fast; the aspect ratios still reach 8000:1
            height = max(1, 16_000_000 // width)
        out = image_processor(images=Image.new("RGB", (width, height), (90, 160, 30)))
        assert out["pixel_values"].shape[1:] == (3, model.config.crop_size, model.config.crop_size)
        assert out["image_sizes"].tolist() == [[height, width]]
        with torch.no_grad():
            feats = model.get_image_features(
                out["pixel_values"], out["image_sizes"], out["image_layouts"], out["image_num_crops"]
            )
        assert [f.shape[0] for f in feats] == out["num_image_tokens"]

    check()


# ---------------------------------------------------------------- bad input: one ValueError naming the values


def test_forward_and_generate_check_their_inputs():
    model = tiny_model()
    vocab = model.config.text_config.vocab_size
    ids = torch.tensor([[1, 2, 3, 4]])
    cases = [
        (dict(input_ids=torch.tensor([[1, vocab + 5, 3]])), rf"input_ids holds ids outside the vocabulary \(0..{vocab - 1}\): \[{vocab + 5}\]"),
        (dict(input_ids=torch.tensor([[1, -3, 3]])), r"input_ids holds ids outside the vocabulary .*\[-3\]"),
        (dict(input_ids=torch.tensor([1, 2, 3])), r"input_ids must be an integer tensor of shape \(batch, length\)"),
        (dict(input_ids=ids, attention_mask=torch.ones(1, 7)), r"attention_mask shape \(1, 7\) must be \(batch, length\) = \(1, 4\)"),
        (dict(input_ids=ids, labels=torch.tensor([[1, 2, vocab, -100]])), rf"labels holds ids outside the vocabulary .*\[{vocab}\]"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    crop = model.config.crop_size
    for shape in [(1, 3, crop + 1, crop), (1, 4, crop, crop), (3, crop, crop)]:
        with pytest.raises(ValueError, match=rf"pixel_values must be \(num_crops, 3, {crop}, {crop}\) crops"):
            model.get_image_features(torch.zeros(shape), image_layouts=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"input_ids holds ids outside the vocabulary"):
        model.diffusion_generate(torch.tensor([[1, vocab + 1]]), max_new_tokens=2, steps=2, block_length=2)
