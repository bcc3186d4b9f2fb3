"""The official-checkpoint converter: one key table, refusal of unknown/missing keys, atomic output."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_v.conversion.official import KEY_TABLE, ConversionError, convert, map_key

from paths import REPO, llada_v_command

SCRIPT = REPO / "convert_checkpoints" / "convert_llada_v_official.py"


def _official_copy(golden_dir, tmp_path, mutate=None, shards=1):
    """A copy of the golden official checkpoint, optionally changed and split into shards with an index."""
    src = golden_dir / "official_tiny"
    dst = tmp_path / "official"
    dst.mkdir()
    for name in ("config.json", "vision_config.json"):
        (dst / name).write_text((src / name).read_text())
    tensors = load_file(src / "model.safetensors")
    if mutate:
        mutate(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors")
    else:
        keys = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, dst / name)
            weight_map.update({k: name for k in part})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _run_cli(input_dir, output_dir):
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--input-dir",
            str(input_dir),
            "--output-dir",
            str(output_dir),
            "--vision-config",
            str(input_dir / "vision_config.json"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_official_key_maps_and_dropped_keys_have_reasons(golden_dir):
    keys = load_file(golden_dir / "official_tiny" / "model.safetensors").keys()
    mapped = {map_key(k)[0] for k in keys}
    assert None not in mapped  # the golden checkpoint has no dropped keys
    assert "vision_tower.post_layernorm.weight" in mapped
    for _, template, reason in KEY_TABLE:
        assert template is not None or reason, "a dropped key needs a reason"
    assert map_key("model.layers.3.self_attn.rotary_emb.inv_freq")[0] is None
    with pytest.raises(ConversionError, match="unknown key"):
        map_key("model.layers.0.self_attn.q_proj.bias")


def test_converted_weights_equal_the_official_tensors(golden_dir, golden_checkpoint):
    official = load_file(golden_dir / "official_tiny" / "model.safetensors")
    index = json.loads((golden_checkpoint / "model.safetensors.index.json").read_text())
    converted = {}
    for shard in set(index["weight_map"].values()):
        converted.update(load_file(golden_checkpoint / shard))
    assert len(converted) == len(official) == 63
    for key, tensor in official.items():
        assert torch.equal(converted[map_key(key)[0]], tensor.float()), key
    config = json.loads((golden_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llada_v"
    assert config["auto_map"]["AutoModel"] == "modeling_llada_v.LladaVModel"
    # Official [w, h] pinpoints became (h, w) in the same order.
    assert config["image_grid_pinpoints"][1] == [768, 384]
    assert config["bos_token_id"] == 126080  # not the official config's out-of-vocab 128000
    for name in (
        "modeling_llada_v.py",
        "configuration_llada_v.py",
        "generation_utils.py",
        "image_layout_llada_v.py",
        "generation_config.json",
    ):
        path = golden_checkpoint / name
        assert path.is_file() and not path.is_symlink(), name


@pytest.mark.slow
def test_sharded_input_and_output(golden_dir, tmp_path):
    src = _official_copy(golden_dir, tmp_path, shards=3)
    out = convert(
        src, tmp_path / "ck", src / "vision_config.json", dtype=torch.bfloat16, max_shard_size="4MB", progress=False
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert len(index["weight_map"]) == 63


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_extra_or_missing_key_fails_and_leaves_no_output(golden_dir, tmp_path, change):
    def mutate(tensors):
        if change == "extra":
            tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
        else:
            del tensors["model.layers.1.mlp.up_proj.weight"]

    src = _official_copy(golden_dir, tmp_path, mutate)
    out = tmp_path / "ck"
    result = _run_cli(src, out)
    assert result.returncode != 0
    assert ("unknown key" if change == "extra" else "lacks 1 expected tensors") in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ck")]  # no temp folder left behind


def test_refuses_unsupported_official_settings(golden_dir, tmp_path):
    src = _official_copy(golden_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["mm_projector_type"] = "linear"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="mm_projector_type is 'linear'"):
        convert(src, tmp_path / "ck", src / "vision_config.json", progress=False)
    assert not (tmp_path / "ck").exists()


def test_existing_output_is_not_overwritten(golden_dir, tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(golden_dir / "official_tiny", tmp_path / "ck", progress=False)


@pytest.mark.slow
def test_convert_and_push_to_a_local_fake_hub(golden_dir, tmp_path):
    import os

    from fake_hub import FakeHub

    out = tmp_path / "ck"
    with FakeHub() as hub:
        env = dict(
            os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_fake", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1"
        )
        env.pop("HF_HUB_OFFLINE", None)
        src = golden_dir / "official_tiny"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "llada_v.cli",
                "convert",
                "--input-dir",
                str(src),
                "--output-dir",
                str(out),
                "--vision-config",
                str(src / "vision_config.json"),
                "--no-progress",
                "--push-to-hub",
                "me/llada-v-tiny",
                "--private",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        repo = hub.repos["me/llada-v-tiny"]
        assert repo["private"] is True
        local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert set(repo["files"]) == set(local)
        assert all(repo["files"][name] == data for name, data in local.items())


def test_private_without_push_is_rejected(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_v.cli",
            "convert",
            "--input-dir",
            str(tmp_path),
            "--output-dir",
            str(tmp_path / "x"),
            "--private",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--private only makes sense with --push-to-hub" in result.stderr


def test_converter_writes_a_processor_when_a_tokenizer_is_given(golden_dir, tmp_path):
    from llada_v.conversion.tokenizer import write_standin_released_tokenizer

    tokenizer_dir = write_standin_released_tokenizer(tmp_path / "released_tokenizer")
    src = golden_dir / "official_tiny"
    # verify() loads the processor with AutoProcessor in a fresh process and checks the <image> id.
    out = convert(src, tmp_path / "ck", src / "vision_config.json", progress=False, tokenizer_dir=tokenizer_dir)
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_llada_v.LladaVProcessor"
    for name in ("processing_llada_v.py", "image_processing_llada_v.py", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<image>") == 126349
    assert len(tokenizer) == 126350


def test_converter_without_tokenizer_writes_model_only(golden_checkpoint):
    assert not (golden_checkpoint / "processor_config.json").exists()


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_the_readme_command_works_with_a_relative_output_folder(golden_dir, tmp_path):
    src = _official_copy(golden_dir, tmp_path)
    result = subprocess.run(
        [*llada_v_command(), "convert", "--input-dir", "official", "--output-dir", "llada-v-hf",
         "--vision-config", "official/vision_config.json", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "llada-v-hf" / "config.json").is_file() and src.is_dir()


@pytest.mark.parametrize(  # one case in the fast tier, the other two in the slow one
    "where", [pytest.param("equal", marks=pytest.mark.slow), "inside", pytest.param("above", marks=pytest.mark.slow)]
)
def test_no_flag_can_delete_or_alter_the_input(golden_dir, tmp_path, where):
    src = _official_copy(golden_dir, tmp_path)
    (tmp_path / "unrelated.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = {"equal": src, "inside": src / "converted", "above": tmp_path}[where]
    for extra in ([], ["--overwrite"]):
        result = subprocess.run(
            [*llada_v_command(), "convert", "--input-dir", str(src), "--output-dir", str(out),
             "--vision-config", str(src / "vision_config.json"), "--no-progress", *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 2 and "overlaps the input" in result.stderr, result.stderr[-1000:]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (tmp_path / "unrelated.txt").read_text() == "keep me"


def test_truncated_shard_is_named_and_exits_2(golden_dir, tmp_path):
    src = _official_copy(golden_dir, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    result = _run_cli(src, tmp_path / "ck")
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "truncated or corrupt" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "ck").exists()


@pytest.mark.parametrize(
    "config_text,message",
    [
        ('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}', "is a 'llama' checkpoint"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_foreign_or_malformed_config_is_named(golden_dir, tmp_path, config_text, message):
    src = _official_copy(golden_dir, tmp_path)
    (src / "config.json").write_text(config_text)
    result = _run_cli(src, tmp_path / "ck")
    assert result.returncode == 2 and message in result.stderr and "config.json" in result.stderr


def test_zero_shard_size_is_refused(golden_dir, tmp_path):
    src = _official_copy(golden_dir, tmp_path)
    with pytest.raises(ValueError, match="shard size must be positive"):
        convert(src, tmp_path / "ck", src / "vision_config.json", max_shard_size="0", progress=False)


@pytest.mark.slow
def test_a_killed_writers_temp_folder_is_cleaned_by_the_next_run(golden_dir, tmp_path):
    src = _official_copy(golden_dir, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".ck.tmp-stale"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"partial")
    (stale / ".llada_v-writer").write_text(f"{__import__('socket').gethostname()} {dead.stdout.strip()}\n")
    foreign = tmp_path / ".ck.tmp-other"  # no owner record: named in a warning, never deleted
    foreign.mkdir()
    convert(src, tmp_path / "ck", src / "vision_config.json", dtype=torch.float32, progress=False)
    assert not stale.exists() and foreign.exists() and (tmp_path / "ck" / "config.json").is_file()


def test_without_a_tokenizer_the_image_processor_is_written(golden_checkpoint):
    # The converter's own fresh-process check loaded it with AutoProcessor; the full processor needs a tokenizer.
    folder = golden_checkpoint
    assert (folder / "preprocessor_config.json").is_file() and not (folder / "processor_config.json").exists()
    config = json.loads((folder / "preprocessor_config.json").read_text())
    assert config["auto_map"] == {"AutoImageProcessor": "image_processing_llada_v.LladaVImageProcessor"}
    assert config["crop_size"] == 384


# ---------------------------------------------------------------------------------------------- model card


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_the_converted_folder_has_a_model_card_with_hub_metadata(golden_checkpoint):
    card = (golden_checkpoint / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert meta["base_model"] == "GSAI-ML/LLaDA-V" and meta["license"] == "other"
    assert meta["license_link"] == "https://huggingface.co/GSAI-ML/LLaDA-V" and "llada-v" in meta["tags"]
    # The presets come from the folder's generation_config.json and the official per-task table.
    generation = json.loads((golden_checkpoint / "generation_config.json").read_text())
    row = f"| {generation['max_new_tokens']} / {generation['steps']} / {generation['block_length']} |"
    assert row in card and "| `chartqa*` (official evaluation setting) | 16 / 16 / 16 |" in card
    assert "trust_remote_code=True" in card and "llada_v.conversion.official.convert(" in card
    assert "image processor only" in card  # converted without a tokenizer
    from llada_v import __version__

    assert f"Converted with llada-v {__version__}" in card


def test_huggingface_hub_reads_the_model_card(golden_checkpoint):
    ModelCard = pytest.importorskip("huggingface_hub").ModelCard
    card = ModelCard.load(golden_checkpoint / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.base_model == "GSAI-ML/LLaDA-V" and "masked-diffusion" in card.data.tags
    assert "# LLaDA-V (llada-v format)" in card.text


@pytest.mark.slow
def test_the_cli_records_its_command_and_a_tokenizer_in_the_card(golden_dir, tmp_path):
    from llada_v.conversion.tokenizer import write_standin_released_tokenizer

    tokenizer_dir = write_standin_released_tokenizer(tmp_path / "released_tokenizer")
    src = golden_dir / "official_tiny"
    result = subprocess.run(
        [*llada_v_command(), "convert", "--input-dir", str(src), "--output-dir", str(tmp_path / "ck"),
         "--vision-config", str(src / "vision_config.json"), "--tokenizer-dir", str(tokenizer_dir), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    card = (tmp_path / "ck" / "README.md").read_text()
    assert f"llada-v convert --input-dir {src} --output-dir {tmp_path / 'ck'}" in card
    assert "holds the full processor" in card and _front_matter(card)["pipeline_tag"] == "image-text-to-text"
