"""lmms-eval with the `llada_v` plugin across processes: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
--num_processes 2 -m lmms_eval` on a machine without GPUs (data parallel on the CPU, gloo) gives the single-process scores and the same response for every document.

The local tasks and the demo-shaped checkpoint are the ones of tests/test_lmms_eval.py. Both runs go through a
thin wrapper that records, per process, which requests the plugin answered (to show the work was split), then
runs `python -m lmms_eval` unchanged.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from llada_v.evaluation.lmms_eval_plugin import LladaV

from helpers import accelerate_launch, build_demo_like_checkpoint, write_local_task

_RECORDING_LMMS_EVAL = r"""
import json, os, runpy, sys
from llada_v.evaluation import lmms_eval_plugin

calls = []


def recording(name):
    original = getattr(lmms_eval_plugin.LladaV, name)

    def method(self, requests):
        calls.append({"method": name, "requests": len(requests), "rank": self.rank, "world_size": self.world_size,
                      "device": str(self.device)})
        return original(self, requests)

    return method


for name in ("generate_until", "loglikelihood"):
    setattr(lmms_eval_plugin.LladaV, name, recording(name))
sys.argv = ["lmms_eval", *sys.argv[1:]]
try:
    runpy.run_module("lmms_eval", run_name="__main__")
finally:
    with open(os.path.join(os.environ["CALLS_DIR"], f"calls{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(calls, f)
"""


def _evaluate(tmp_path, name, launcher, demo_ck, task_dir, **env):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "recording_lmms_eval.py"
    script.write_text(_RECORDING_LMMS_EVAL)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "CALLS_DIR": str(out),
        **env,
    }
    result = subprocess.run(
        [
            *launcher,
            str(script),
            "--model",
            "llada_v",
            "--model_args",
            f"pretrained={demo_ck},mc_num=4",
            "--tasks",
            "tiny_colors_gen,tiny_colors_mc",
            "--include_path",
            str(task_dir),
            "--batch_size",
            "2",
            "--output_path",
            str(out / "results"),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "Error during evaluation" not in result.stderr, result.stderr[-4000:]
    scores = json.loads(next((out / "results").rglob("*_results.json")).read_text())["results"]
    responses = {}
    for task in ("tiny_colors_gen", "tiny_colors_mc"):
        samples = [json.loads(line) for line in next((out / "results").rglob(f"*_samples_{task}.jsonl")).open()]
        responses[task] = sorted((s["doc_id"], json.dumps(s["filtered_resps"])) for s in samples)
    calls = {int(p.stem.removeprefix("calls")): json.loads(p.read_text()) for p in out.glob("calls*.json")}
    return scores, responses, calls


def _same_responses(left: dict, right: dict) -> bool:
    """Equal documents and answers; number-like strings (the losses) equal up to a relative 1e-6."""

    def same(a, b) -> bool:
        if isinstance(a, list) or isinstance(b, list):
            return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6)
        except (TypeError, ValueError):
            return a == b

    return left.keys() == right.keys() and all(
        [doc for doc, _ in left[task]] == [doc for doc, _ in right[task]]
        and all(same(json.loads(x), json.loads(y)) for (_, x), (_, y) in zip(left[task], right[task]))
        for task in left
    )


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path):
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (pip install 'llada-v[eval]', see docs/evaluation.md)")
    demo_ck = build_demo_like_checkpoint(tmp_path / "demo_like")
    task_dir = write_local_task(tmp_path / "task")
    single = _evaluate(tmp_path, "single", [sys.executable], demo_ck, task_dir)
    # `--cpu` would start one process only (accelerate's simple launcher); ACCELERATE_USE_CPU puts these on the CPU.
    launcher = accelerate_launch(2)
    parallel = _evaluate(tmp_path, "parallel", launcher, demo_ck, task_dir, ACCELERATE_USE_CPU="true")

    scores, responses, calls = parallel
    assert scores == single[0]
    # Every document: the same answer text, the same greedy flags, and the same losses up to float32 rounding (the
    # ranks are other processes, whose first forward may take another kernel path: seen 4.2535739 vs 4.2535734).
    assert _same_responses(responses, single[1]), (responses, single[1])
    assert len(responses["tiny_colors_mc"]) == 3 and len(responses["tiny_colors_gen"]) == 3
    # The work was split: each rank answered part of the requests on the CPU (3 questions, 3 options each).
    assert sorted(calls) == [0, 1]
    for rank, rank_calls in calls.items():
        assert {c["rank"] for c in rank_calls} == {rank} and {c["world_size"] for c in rank_calls} == {2}
        assert {c["device"] for c in rank_calls} == {"cpu"}
    loglikelihood = [sum(c["requests"] for c in calls[r] if c["method"] == "loglikelihood") for r in (0, 1)]
    assert 0 < min(loglikelihood) and max(loglikelihood) < 9
    assert [c["requests"] for c in single[2][0] if c["method"] == "loglikelihood"] == [9]


def test_a_launch_that_accelerate_does_not_see_is_refused(monkeypatch, tmp_path):
    # `accelerate launch --multi_gpu --num_processes 2` without GPUs and without ACCELERATE_USE_CPU: accelerate
    # runs each process alone, each would evaluate everything and the evaluator's gathers would fail.
    from accelerate import Accelerator

    Accelerator(cpu=True)  # this test process: accelerate's state is set up for one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = r"2 processes were launched \(WORLD_SIZE\) but accelerate runs 1 .*ACCELERATE_USE_CPU=true accelerate"
    with pytest.raises(ValueError, match=expected):
        LladaV(pretrained=str(tmp_path / "not_loaded"), device="cpu")
