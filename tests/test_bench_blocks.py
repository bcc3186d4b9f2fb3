"""benchmarks/bench_blocks.py (the accelerations over many blocks, docs/performance.md) on a few held-out scenes
of the shipped demo model: the result's structure, exact mode equal to the official loop, and the scenes
held out from training."""

import importlib.util

import pytest
import torch

from llada_v.demo.app import load_demo
from llada_v.demo.train import TRAIN_SEED_OFFSET

from paths import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_blocks", REPO / "benchmarks" / "bench_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return load_demo()


def test_held_out_scenes_have_the_asked_shape_count_and_alternate_orders(bench):
    scenes = bench.held_out_scenes(4, seed=0, objects=3)
    assert [len(s["truth"].split()) for s in scenes] == [6] * 4
    assert [s["question"] for s in scenes] == ["Which shapes are there?", "Which colors are there?"] * 2
    # string seeds: the training run draws integer seeds >= TRAIN_SEED_OFFSET, so no scene is a training scene
    assert bench.SEED_PREFIX.startswith("held-out") and TRAIN_SEED_OFFSET == 1_000_000
    with pytest.raises(ValueError, match="objects must be 1, 2 or 3"):
        bench.held_out_scenes(1, objects=4)
    with pytest.raises(ValueError, match="n must be positive, got 0"):
        bench.held_out_scenes(0)


def test_held_out_scenes_of_the_scenes_task_are_described_from_the_left(bench):
    scenes = bench.held_out_scenes(30, seed=0, objects=0, task="scenes")
    assert {s["question"] for s in scenes} == {"Which shapes are there?"}
    assert len({len(s["truth"].split()) for s in scenes}) >= 3  # any size: 5n - 2 words for n objects
    five = bench.held_out_scenes(2, seed=0, objects=5, task="scenes")
    assert [len(s["truth"].split()) for s in five] == [23, 23] and " left of " in five[0]["truth"]
    with pytest.raises(ValueError, match="objects must be 0 \\(any\\) to 5 \\(the scenes task\\), got 6"):
        bench.held_out_scenes(1, objects=6, task="scenes")


def test_method_config_refuses_unknown_settings(bench, demo):
    model, _ = demo
    with pytest.raises(ValueError, match=r"unknown generation settings \['shortlist'\] for method 'x'"):
        bench.method_config(model, "x", bench.SETTINGS, {"shortlist": 4})
    assert bench.method_config(model, "x", bench.SETTINGS, {"lm_head_shortlist": 4}).lm_head_shortlist == 4


def test_token_agreement_counts_positions_over_the_longer_answer(bench):
    assert bench.token_agreement([[1, 2, 3]], [[1, 2, 3]]) == 1.0
    assert bench.token_agreement([[1, 2, 9]], [[1, 2, 3, 4]]) == 0.5
    assert bench.token_agreement([[1], [5, 6]], [[2], [5, 6]]) == pytest.approx(2 / 3)


@pytest.mark.slow
def test_benchmark_on_a_few_scenes_has_every_method_and_exact_equals_the_official_loop(bench, demo):
    model, processor = demo
    extra = {"fast_shortlist": {"lm_head_shortlist": 4}}
    result = bench.benchmark(model, processor, n=2, batch_size=2, extra=extra, reference=True)
    assert list(result["methods"]) == [*bench.METHODS, "fast_shortlist"]
    assert result["settings"] == bench.SCENES_SETTINGS and result["n"] == 2  # the shipped model: the scenes task
    for row in result["methods"].values():
        assert set(row) == {"exact_match", "token_agreement", "identical_to_exact", "forward_passes", "seconds"}
        assert 0 <= row["exact_match"] <= 1 and 0 <= row["token_agreement"] <= 1
        assert row["forward_passes"] > 0
    exact = result["methods"]["exact"]
    assert exact["token_agreement"] == 1.0 and exact["identical_to_exact"] == 1.0
    # 2 rows x 4 blocks x 8 steps, fewer only when a row stops early
    assert exact["forward_passes"] <= 64
    # exact mode is the official loop, id for id (`<|eot_id|>` appended by both when the answer stops)
    assert result["ids"]["exact"] == result["reference_ids"]
    assert result["exact_differs_from_reference"] == 0
    assert all(1 <= n <= 32 for n in result["answer_tokens"])  # the 32-token canvas: 4 blocks of 8
    table = bench.markdown_table(result)
    assert table.count("\n") == 2 + len(result["methods"]) - 1 and "| fast_shortlist |" in table
