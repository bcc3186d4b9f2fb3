"""DeepSpeed ZeRO-3 through the Trainer with the shipped `configs/deepspeed_zero3.json`: on GPUs only.

DeepSpeed cannot run this entry on CPU processes (docs/training.md, "Scaling out"; the errors are in
docs/history/training-runs.md), so without CUDA and deepspeed this test is skipped; on a GPU machine
(`pip install -e ".[test,deepspeed]"`) it runs one process per GPU (at most 2) and checks the losses against one
process without DeepSpeed on the same global batches, and that the final export loads and generates.
"""

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import load_file

from llada_v import LladaVModel

from helpers import SCALE_ENV as ENV
from helpers import accelerate_launch, rank_logs, run_ok, scale_flags, scale_setup
from paths import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="DeepSpeed ZeRO-3 runs on GPUs only (docs/training.md)"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]

RUNNER = REPO / "tests" / "scale_runner.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return scale_setup(tmp_path_factory.mktemp("zero3"))


def test_zero3_matches_one_process_and_exports_a_loadable_model(setup, tmp_path):
    gpus = min(2, torch.cuda.device_count())
    common = [
        "--stage",
        "2",
        "--vision_lr",
        "1e-2",
        "--projector_lr",
        "3e-2",
        "--language_lr",
        "5e-3",
        "--max_steps",
        "4",
        "--save_strategy",
        "no",
    ]
    single = tmp_path / "single"
    flags = scale_flags(setup, single, *common, "--per_device_train_batch_size", str(gpus))
    flags.remove("--use_cpu")
    env_gpus = {**ENV, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    run_ok([sys.executable, str(RUNNER), *flags], env=env_gpus)  # one process, no DeepSpeed, on cuda:0
    zero3 = tmp_path / "zero3"
    flags = scale_flags(
        setup,
        zero3,
        *common,
        "--per_device_train_batch_size",
        "1",
        "--deepspeed",
        str(REPO / "configs" / "deepspeed_zero3.json"),
    )
    flags.remove("--use_cpu")
    launch = accelerate_launch(gpus)
    run_ok([*launch, str(RUNNER), *flags], env=env_gpus)
    (reference,) = rank_logs(single, 1)
    ranks = rank_logs(zero3, gpus)
    assert all(r["world_size"] == gpus for r in ranks)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=0)
    a, b = load_file(single / "model.safetensors"), load_file(zero3 / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-3)
    model = LladaVModel.from_pretrained(zero3).eval()
    ids = torch.tensor([[model.config.bos_token_id, model.config.eot_token_id]])
    assert model.diffusion_generate(input_ids=ids, max_new_tokens=4, steps=4, block_length=4).shape[1] > 2
