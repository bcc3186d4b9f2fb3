"""Loading in low precision and with bitsandbytes on CPU: what is quantised and what is not."""

import pytest
import torch

from llada_v import LladaVModel

from tiny import image_prompt, tiny_model

# bitsandbytes' packed CPU 4-bit kernel needs in_features divisible by its block size (64).
WIDE_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_q")
    tiny_model(text_config=WIDE_TEXT).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["load_in_4bit", "load_in_8bit"])
def test_bitsandbytes_keeps_vision_projector_and_lm_head_unquantised(saved_tiny, mode):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = LladaVModel.from_pretrained(saved_tiny, quantization_config=BitsAndBytesConfig(**{mode: True})).eval()
    linear_types = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantised = {name for name, kind in linear_types.items() if kind != "Linear"}
    assert quantised and all(name.startswith("language_model.layers.") for name in quantised)
    assert {n for n in linear_types if n.startswith("language_model.layers.")} == quantised
    assert model.image_newline.dtype == torch.float32
    ids, pixel_values, sizes = image_prompt(model.config)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes).logits
    assert logits.shape == (1, ids.shape[1], 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_runs_an_image_prompt(saved_tiny, dtype):
    model = LladaVModel.from_pretrained(saved_tiny, dtype=dtype).eval()
    assert model.language_model.layers[0].mlp.up_proj.weight.dtype == dtype
    assert model.lm_head.weight.dtype == dtype
    ids, pixel_values, sizes = image_prompt(model.config)
    with torch.no_grad():
        reference = (
            LladaVModel.from_pretrained(saved_tiny)
            .eval()(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes)
            .logits
        )
        logits = model(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes).logits
    assert logits.dtype == torch.float32  # logits are always returned in float32
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mode", ["load_in_4bit", "load_in_8bit"])
def test_golden_checkpoint_generates_quantised_on_cpu(golden_checkpoint, mode):
    """The converted golden checkpoint (32 wide) in 4/8-bit on CPU: decoder linears quantised, vision tower,
    projector, newline and lm_head not; `diffusion_generate` runs. Its 4-bit layers are too narrow for
    bitsandbytes' packed CPU kernel (in_features % 64 != 0), so `from_pretrained` keeps them portable."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    model = LladaVModel.from_pretrained(golden_checkpoint, quantization_config=BitsAndBytesConfig(**{mode: True}))
    model.eval()
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, k in kinds.items() if k != "Linear"} == {n for n in kinds if n.startswith("language_model.")}
    assert kinds["lm_head"] == "Linear" and model.image_newline.dtype == torch.float32
    ids, pixel_values, sizes = image_prompt(model.config)
    out = model.diffusion_generate(
        input_ids=ids, pixel_values=pixel_values, image_sizes=sizes, max_new_tokens=4, steps=2, block_length=4
    )
    assert out.shape == (1, ids.shape[1] + 4)
    assert (out[0, ids.shape[1] :] != model.config.mask_token_id).all()
    if mode == "load_in_4bit":  # every decoder linear has in_features 32 or 96: all portable now
        from bitsandbytes.nn.modules import has_avx512bf16

        portable = [n for n, m in model.named_modules() if getattr(m, "support_avx512bf16_for_cpu", None) is False]
        # Without AVX512-BF16 bitsandbytes never selects the packed kernel and sets no flag to switch off.
        expected = [n for n, k in kinds.items() if k == "Linear4bit"] if has_avx512bf16() else []
        assert sorted(portable) == sorted(expected)


def test_wide_4bit_layers_keep_the_packed_cpu_kernel(saved_tiny):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.modules import has_avx512bf16
    from transformers import BitsAndBytesConfig

    model = LladaVModel.from_pretrained(saved_tiny, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    flags = [m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert flags and all(flag == has_avx512bf16() for flag in flags)  # 64 / 128 wide: untouched
