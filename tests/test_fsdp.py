"""FSDP2 through the Trainer, run for real: 2 CPU processes (gloo) under `accelerate launch` with the shipped
`configs/fsdp2.json`, against one process on the same global batches.

The masking noise is fixed by the data (tests/scale_runner.py says why) and both runs read the data in order
(`--train_sampling_strategy sequential`): one process takes samples (0, 1), (2, 3)...; with two, rank 0 takes 0, 2...
and rank 1 takes 1, 3..., the same global batches. `--padding masked` makes a sample's loss independent of what
else is in its per-device batch (the official padding supervises EOS up to the longest sample of the batch, so
2 x 1 and 1 x 2 samples are different objectives by design).
"""

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from llada_v import LladaVModel

from helpers import SCALE_ENV as ENV
from helpers import accelerate_launch, rank_logs, run_ok, scale_flags, scale_setup
from paths import REPO

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("scale_runner.py")
FSDP_CONFIG = REPO / "configs" / "fsdp2.json"
UNITS = ["LladaVDecoderLayer", "SiglipEncoderLayer", "SiglipVisionEmbeddings"]
# Different rates per module group, large enough that a group updated with another group's rate changes the losses.
RATES = {"vision": 1e-2, "projector": 3e-2, "language": 5e-3}
LAUNCH = accelerate_launch(2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return scale_setup(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def runs(setup):
    """Stage 2 with per-module rates, 4 steps, global batch 2: one process (batch 2) and FSDP2 on two (batch 1
    each, sharded checkpoint every 2 steps, the shipped config: activation checkpointing, sharded state dicts)."""
    rates = ["--stage", "2", *(x for g, lr in RATES.items() for x in (f"--{g}_lr", str(lr))), "--max_steps", "4"]
    single = setup.root / "single"
    run_ok(
        [
            sys.executable,
            str(RUNNER),
            *scale_flags(setup, single, *rates, "--per_device_train_batch_size", "2", "--save_strategy", "no"),
        ]
    )
    fsdp = setup.root / "fsdp"
    fsdp_flags = [
        *rates,
        "--per_device_train_batch_size",
        "1",
        "--save_steps",
        "2",
        "--fsdp",
        "--fsdp_config",
        str(FSDP_CONFIG),
    ]
    run_ok([*LAUNCH, str(RUNNER), *scale_flags(setup, fsdp, *fsdp_flags)])
    return SimpleNamespace(single=single, fsdp=fsdp, fsdp_flags=fsdp_flags)


def test_fsdp2_two_processes_give_the_one_process_losses_and_weights(runs):
    (single,) = rank_logs(runs.single, 1)
    ranks = rank_logs(runs.fsdp, 2)
    assert not single["fsdp"] and single["world_size"] == 1
    assert [r["world_size"] for r in ranks] == [2, 2] and all(r["fsdp"] for r in ranks)
    assert len(single["losses"]) == 4 and ranks[0]["losses"] == ranks[1]["losses"]
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=0)
    # The final export is a normal checkpoint with the one-process weights (float noise amplified by Adam).
    a, b = load_file(runs.single / "model.safetensors"), load_file(runs.fsdp / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)
    initial = load_file(Path(runs.fsdp).parent / "ck" / "model.safetensors")
    assert sum(not torch.equal(initial[k], b[k]) for k in b) > len(b) // 2  # it did train


def test_fsdp2_shards_by_layer_and_keeps_the_per_module_learning_rates(runs):
    (single,) = rank_logs(runs.single, 1)
    rank = rank_logs(runs.fsdp, 2)[0]
    # The shard units come from the model's _no_split_modules (only those it holds), one FSDP group per layer.
    assert rank["units"] == UNITS
    sharded = rank["sharded_modules"]
    assert sharded.count("FSDPLladaVDecoderLayer") == 2 and sharded.count("FSDPSiglipEncoderLayer") == 2
    assert sharded.count("FSDPSiglipVisionEmbeddings") == 1 and "FSDPLladaVModel" in sharded
    assert rank["checkpoint_wrapped"] == 5  # FSDP's activation checkpointing on every unit (fsdp2.json)
    # LladaVTrainer's parameter groups survive the switch to DTensor parameters, with their rates.
    assert [(g["name"], g["lr"], g["tensors"]) for g in rank["groups"]] == [
        (g["name"], g["lr"], g["tensors"]) for g in single["groups"]
    ]
    assert all(g["dtensors"] == g["tensors"] for g in rank["groups"])
    assert {g["name"].split("/")[0]: g["lr"] for g in rank["groups"]} == RATES
    # Each rank holds half of the parameters and of the Adam state (dim-0 shards of 2).
    for key in ("parameter_bytes", "optimizer_bytes"):
        assert abs(rank[key] - single[key] / 2) <= 0.01 * single[key], (key, rank[key], single[key])


def test_fsdp2_sharded_checkpoint_resumes_with_the_same_next_step_loss(setup, runs):
    checkpoint = runs.fsdp / "checkpoint-2"
    # Weights and optimizer as torch.distributed.checkpoint shards, plus config, processor and remote code.
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert not (checkpoint / "model.safetensors").exists()
    for name in ("config.json", "processor_config.json", "modeling_llada_v.py", "rng_state_1.pth"):
        assert (checkpoint / name).is_file(), name
    resumed = setup.root / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    run_ok([*LAUNCH, str(RUNNER), *scale_flags(setup, resumed, *runs.fsdp_flags, "--resume_from_checkpoint", "last")])
    straight = rank_logs(runs.fsdp, 2)[0]["losses"]
    again = rank_logs(resumed, 2)
    assert again[0]["losses"] == again[1]["losses"] == straight  # steps 1-2 from the checkpoint, 3-4 recomputed
    a, b = load_file(runs.fsdp / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # `accelerate merge-weights CKPT/pytorch_model_fsdp_0 CKPT` makes the sharded checkpoint a loadable one.
    from accelerate.utils import merge_fsdp_weights

    merge_fsdp_weights(str(checkpoint / "pytorch_model_fsdp_0"), str(checkpoint))
    merged = load_file(checkpoint / "model.safetensors")
    assert merged.keys() == a.keys() and any(not torch.equal(merged[k], a[k]) for k in a)  # step 2, not step 4
    assert isinstance(LladaVModel.from_pretrained(checkpoint), LladaVModel)


_FRESH_GENERATE = r"""
import sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, out = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.new("RGB", (40, 30), (200, 30, 30))], text=[prompt], return_tensors="pt")
ids = model.diffusion_generate(**inputs, max_new_tokens=8, steps=8, block_length=8)
torch.save({"ids": ids, "inputs": dict(inputs)}, out)
"""


def test_fsdp2_export_loads_with_automodel_in_a_fresh_process_and_generates(runs, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    out = tmp_path / "generated.pt"
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_GENERATE, str(runs.fsdp), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    prompt_length = got["inputs"]["input_ids"].shape[1]
    assert got["ids"].shape[1] > prompt_length
    # The package's own class on the same folder and inputs gives the same answer.
    model = LladaVModel.from_pretrained(runs.fsdp).eval()
    expected = model.diffusion_generate(**got["inputs"], max_new_tokens=8, steps=8, block_length=8)
    assert torch.equal(got["ids"], expected)


def test_fsdp2_lora_with_bf16_trains_the_adapters_and_merges(setup):
    out = setup.root / "lora"
    run_ok(
        [
            *LAUNCH,
            str(RUNNER),
            *scale_flags(
                setup,
                out,
                "--max_steps",
                "2",
                "--per_device_train_batch_size",
                "1",
                "--save_strategy",
                "no",
                "--bf16",
                "--lora_r",
                "4",
                "--lora_modules_to_save",
                "multi_modal_projector",
                "--merge_lora_at_end",
                "true",
                "--fsdp",
                "--fsdp_config",
                str(FSDP_CONFIG),
            ),
        ]
    )
    ranks = rank_logs(out, 2)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 2
    assert ranks[0]["mixed_precision"] == "bf16" and ranks[0]["fsdp"]
    # LoRA uses the model's own activation checkpointing: FSDP's wrapper would make PEFT save no LoRA weights.
    assert ranks[0]["activation_checkpointing"] and ranks[0]["checkpoint_wrapped"] == 0
    assert {g["name"].split("/")[0]: g["lr"] for g in ranks[0]["groups"]} == {"projector": 1e-5, "language": 2e-4}
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in adapter if ".lora_B." in k]
    assert len(lora_b) == 7 * 2 and len([k for k in adapter if ".lora_A." in k]) == 7 * 2
    assert all(adapter[k].abs().max() > 0 for k in lora_b)  # B starts at zero: every adapter was trained
    merged = LladaVModel.from_pretrained(out / "merged")
    base = LladaVModel.from_pretrained(setup.ck)
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(n))}
    assert changed and all(n.startswith(("language_model.layers.", "multi_modal_projector.")) for n in changed)
    assert any(n.startswith("language_model.layers.") for n in changed)
