"""Composing an untrained LLaDA-V from LLaDA-8B-Instruct + SigLIP: tiny fakes of both formats, one key table,
the last SigLIP layer and head dropped, fresh projector/newline, atomic output, the CLI."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from llada_v import LladaVModel
from llada_v.conversion.compose import (
    COMPOSE_KEY_TABLE,
    FRESH_KEYS,
    LLADA_ROWS,
    compose,
    fresh_tensors,
    map_compose_key,
)
from llada_v.conversion.compose import main as compose_main
from llada_v.conversion.official import ConversionError
from llada_v.conversion.tokenizer import write_standin_released_tokenizer

from paths import REPO, SHARED

SCRIPT = REPO / "convert_checkpoints" / "compose_from_llada.py"
REFERENCE = SHARED / "reference" / "llada-8b-instruct"
VISION = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28, patch_size=14
)
N_LAYERS = 2


def _reference_index() -> dict:
    path = REFERENCE / "model.safetensors.index.json"
    if not path.is_file():
        pytest.skip(f"reference LLaDA index not found at {path} (set LLADA_V_SHARED)")
    return json.loads(path.read_text())["weight_map"]


def _fake_llada(folder, mutate=None):
    """LLaDA-8B-Instruct in miniature: the reference config with tiny dims, the reference key names for
    N_LAYERS layers (real vocab 126464), two shards with an index, like the release."""
    folder.mkdir()
    config = json.loads((REFERENCE / "config.json").read_text())
    config.update(
        hidden_size=16, intermediate_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2, num_key_value_heads=2
    )
    (folder / "config.json").write_text(json.dumps(config))
    shapes = {
        "embed_tokens": (126464, 16),
        "lm_head": (126464, 16),
        "norm": (16,),
        "layernorm": (16,),
        "q_proj": (16, 16),
        "k_proj": (16, 16),
        "v_proj": (16, 16),
        "o_proj": (16, 16),
        "gate_proj": (32, 16),
        "up_proj": (32, 16),
        "down_proj": (16, 32),
    }
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for key in _reference_index():
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= N_LAYERS:
            continue
        shape = next(v for k, v in shapes.items() if k in key)
        tensors[key] = torch.randn(shape, generator=generator).to(torch.bfloat16)
    if mutate:
        mutate(tensors)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder, tensors


def _fake_siglip(folder, full_model=True):
    """A SigLIP checkpoint saved by transformers: SiglipModel (with text tower, head, logit scalars; keys
    `vision_model.*`) or SiglipVisionModel (transformers 5 format, unprefixed keys)."""
    torch.manual_seed(2)
    if full_model:
        text = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=1,
        )
        model = SiglipModel(SiglipConfig(vision_config=VISION, text_config=text))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**VISION))
    model.save_pretrained(folder)
    return folder, load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    llada, llada_tensors = _fake_llada(root / "llada")
    write_standin_released_tokenizer(llada)  # the released tokenizer files sit beside the weights
    siglip, siglip_tensors = _fake_siglip(root / "siglip")
    return llada, llada_tensors, siglip, siglip_tensors


@pytest.fixture(scope="module")
def composed(sources, tmp_path_factory):
    llada, _, siglip, _ = sources
    return compose(llada, siglip, tmp_path_factory.mktemp("out") / "ck", dtype=torch.float32, seed=0, progress=False)


def test_key_table_language_rows_are_the_official_ones_and_reference_keys_all_map():
    assert [row[1] for row in LLADA_ROWS] == [
        "language_model.embed_tokens.weight",
        r"language_model.layers.\1.\2",
        None,
        "language_model.norm.weight",
        "lm_head.weight",
    ]
    for key in _reference_index():
        new_key, _ = map_compose_key("llada", key, stored_vision_layers=26)
        assert new_key is not None and new_key.startswith(("language_model.", "lm_head")), key
    for _, _, template, reason in COMPOSE_KEY_TABLE:
        assert template is not None or reason, "a dropped key needs a reason"
    assert map_compose_key("siglip", "vision_model.encoder.layers.26.mlp.fc1.weight", 26)[0] is None
    assert (
        map_compose_key("siglip", "encoder.layers.25.mlp.fc1.weight", 26)[0]
        == "vision_tower.encoder.layers.25.mlp.fc1.weight"
    )
    assert map_compose_key("siglip", "vision_model.head.probe", 26) == (
        None,
        "attention-pooling head: LLaDA-V removes it",
    )
    with pytest.raises(ConversionError, match="unknown key in the llada checkpoint"):
        map_compose_key("llada", "model.layers.0.self_attn.q_proj.bias", 26)


def test_composed_weights_come_from_their_sources(sources, composed):
    _, llada_tensors, _, siglip_tensors = sources
    config = json.loads((composed / "config.json").read_text())
    assert config["model_type"] == "llada_v" and config["auto_map"]["AutoModel"] == "modeling_llada_v.LladaVModel"
    assert config["vision_config"]["num_hidden_layers"] == VISION["num_hidden_layers"] - 1
    assert config["vision_config"]["vision_use_head"] is False
    assert config["max_num_tiles"] == 4 and config["image_grid_pinpoints"][1] == [56, 28]
    assert config["bos_token_id"] == 126080  # not LLaDA's out-of-vocabulary 128000
    model = LladaVModel.from_pretrained(composed, dtype=torch.float32)
    state = model.state_dict()
    for key, tensor in llada_tensors.items():
        assert torch.equal(state[map_compose_key("llada", key, 2)[0]], tensor.float()), key
    for key, tensor in siglip_tensors.items():
        new_key, _ = map_compose_key("siglip", key, 2)
        if new_key is not None:
            assert torch.equal(state[new_key], tensor), key
    index = json.loads((composed / "model.safetensors.index.json").read_text())
    dropped = index["metadata"]["dropped_keys"]
    assert "siglip:vision_model.encoder.layers.2.mlp.fc1.weight" in dropped
    assert "siglip:vision_model.head.probe" in dropped and "siglip:logit_scale" in dropped
    assert any(k.startswith("siglip:text_model.") for k in dropped)
    assert set(index["metadata"]["fresh_keys"]) == set(FRESH_KEYS)
    fresh = fresh_tensors(model.config, seed=0)
    for key, tensor in fresh.items():
        assert torch.equal(state[key], tensor), key


def test_vision_features_equal_siglip_second_to_last_layer_through_the_projector(sources, composed):
    _, _, siglip, _ = sources
    model = LladaVModel.from_pretrained(composed, dtype=torch.float32).eval()
    reference = SiglipModel.from_pretrained(siglip).vision_model.eval()
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The official tower: `mm_vision_select_layer -2` of the pretrained (3-layer) SigLIP, no post_layernorm.
        selected = reference(pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.encode_crops(pixels), model.multi_modal_projector(selected))


def test_fresh_projector_and_newline_are_seeded_like_the_official_init(composed):
    config = LladaVModel.from_pretrained(composed).config
    a, b = fresh_tensors(config, seed=0), fresh_tensors(config, seed=1)
    assert all(torch.equal(a[k], fresh_tensors(config, seed=0)[k]) for k in a)
    assert not torch.equal(a["image_newline"], b["image_newline"])
    bound = 1 / config.vision_config.hidden_size**0.5
    assert a["multi_modal_projector.linear_1.bias"].abs().max() <= bound


def test_composed_folder_has_a_processor_with_the_image_token(composed):
    from llada_v.processing_llada_v import LladaVProcessor

    processor = LladaVProcessor.from_pretrained(composed)
    assert processor.image_token_id == 126349 and processor.image_processor.crop_size == 28


@pytest.mark.slow
def test_siglip_vision_model_format_and_cli(sources, tmp_path):
    llada, _, _, _ = sources
    siglip, tensors = _fake_siglip(tmp_path / "siglip_vision", full_model=False)
    assert "embeddings.patch_embedding.weight" in tensors  # transformers 5: no `vision_model.` prefix
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--llada-dir",
            str(llada),
            "--siglip-dir",
            str(siglip),
            "--output-dir",
            str(out),
            "--dtype",
            "float32",
            "--seed",
            "3",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    state = LladaVModel.from_pretrained(out).state_dict()
    assert torch.equal(
        state["vision_tower.encoder.layers.1.mlp.fc2.weight"], tensors["encoder.layers.1.mlp.fc2.weight"]
    )
    assert "vision_tower.encoder.layers.2.mlp.fc2.weight" not in state


def test_cli_refuses_an_existing_output(sources, composed, capsys):
    llada, _, siglip, _ = sources
    assert compose_main(["--llada-dir", str(llada), "--siglip-dir", str(siglip), "--output-dir", str(composed)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}),
            "unknown key in the llada checkpoint",
        ),
        (
            lambda t: t.pop("model.norm.weight"),
            "the input lacks 1 expected tensors: \\['language_model.norm.weight'\\]",
        ),
        (lambda t: t.update({"model.norm.weight": torch.zeros(8)}), "shape \\(8,\\) does not match"),
    ],
)
def test_bad_sources_fail_without_leaving_output(sources, tmp_path, mutate, message):
    _, _, siglip, _ = sources
    llada, _ = _fake_llada(tmp_path / "llada", mutate)
    out = tmp_path / "out" / "ck"
    with pytest.raises(ConversionError, match=message):
        compose(llada, siglip, out, progress=False)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_unsupported_configs_are_refused(sources, tmp_path):
    llada, _, siglip, _ = sources
    bad = tmp_path / "siglip2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "siglip2", "vision_config": VISION}))
    with pytest.raises(ConversionError, match="model_type is 'siglip2'"):
        compose(llada, bad, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        compose(tmp_path / "missing", siglip, tmp_path / "out", progress=False)


@pytest.mark.parametrize("where", ["llada", "inside siglip", "above both"])
def test_an_output_overlapping_an_input_is_refused_even_with_overwrite(sources, where):
    llada, _, siglip, _ = sources
    out = {"llada": llada, "inside siglip": siglip / "out", "above both": llada.parent}[where]
    before = sorted(p.name for p in llada.iterdir()), sorted(p.name for p in siglip.iterdir())
    with pytest.raises(ValueError, match="overlaps the input"):
        compose(llada, siglip, out, progress=False, overwrite=True)
    assert (sorted(p.name for p in llada.iterdir()), sorted(p.name for p in siglip.iterdir())) == before
