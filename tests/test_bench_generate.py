"""benchmarks/bench_generate.py --config released at a much reduced size: the output structure, the time split
and the methods that must agree (exact mode == the reference loop, a batch row == the single call)."""

import json
import os
import subprocess
import sys

import pytest

from paths import REPO, SHARED

SCRIPT = REPO / "benchmarks" / "bench_generate.py"
# The released architecture with every size shrunk (the vocabulary, special ids and image layout stay real).
SMALL = ["--config", "released", "--layers", "1", "--vision-layers", "1", "--hidden", "64", "--heads", "2",
         "--vision-hidden", "32", "--vision-heads", "2", "--threads", "1", "--skip-full-forward"]  # fmt: skip


def run_bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, *extra, "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


@pytest.mark.slow
def test_exact_mode_equals_the_reference_loop(tmp_path):
    # Text only: the reference loop takes float64 logits over the whole canvas and the real vocabulary, so a
    # 3.7k-token image prompt would need ~10 GB here.
    summary = run_bench(tmp_path, "--image", "none", "--steps", "4", "--gen-length", "8", "--block-length", "4",
                        "--methods", "reference,exact")  # fmt: skip
    ref, exact = summary["methods"]["reference"], summary["methods"]["exact"]
    assert exact["answer_ids"] == ref["answer_ids"]
    assert len(exact["answer_ids"]) == 8
    assert exact["agreement_with_exact"] == ref["agreement_with_exact"] == "8/8"
    assert ref["forward_passes"] == exact["forward_passes"] == 4
    assert summary["model"] == {"hidden": 64, "layers": 1, "heads": 2, "vocab": 126464, "vision_hidden": 32,
                                "vision_layers": 1}  # fmt: skip
    # Every module call of exact mode is one forward pass: decoder and LM head once each, no image.
    assert exact["module_calls"] == {"vision": 0, "decoder": 4, "lm_head": 4}
    assert exact["split_seconds"]["vision"] == 0.0


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "reference" / "images" / "test.jpg").is_file(), reason="needs shared/reference")
def test_real_shaped_request_split_and_batch_rows(tmp_path):
    summary = run_bench(tmp_path, "--steps", "4", "--gen-length", "8", "--block-length", "4",
                        "--methods", "exact,fast", "--batch-sizes", "1,2")  # fmt: skip
    methods = summary["methods"]
    assert set(methods) == {"exact", "fast", "exact x2", "fast x2"}
    for name, row in methods.items():
        assert row["answer_tokens"] == 8 * row["batch_size"], name
        assert row["prompt_length"] == 24 + 3633, name  # the golden case `test_jpg`'s prompt around test.jpg
        assert row["rows_identical"], name  # identical rows of one batch decode identically in float32
        # The image tower runs once per call, the decoder once per forward pass.
        assert row["module_calls"]["vision"] == 1, name
        assert row["module_calls"]["decoder"] == row["forward_passes"], name
        split = row["split_seconds"]
        assert set(split) == {"vision", "decoder", "lm_head", "sampling_and_rest"}
        assert split["vision"] > 0 and split["decoder"] > 0 and split["lm_head"] > 0, (name, split)
        assert sum(split.values()) == pytest.approx(row["seconds"])
        assert row["peak_rss_bytes"] >= row["build_peak_rss_bytes"] > 0
    assert methods["exact x2"]["answer_ids"] == methods["exact"]["answer_ids"]
    assert methods["exact"]["forward_passes"] == methods["fast"]["forward_passes"] == 4  # 2 blocks x 2 steps
    # Exact mode runs the whole canvas at every pass; the dual cache refreshes it once per block, then runs the
    # block's 4 tokens: 2 + 2 x 4 / 3665.
    assert methods["exact"]["cost_full_forwards_tokens"] == 4.0
    assert methods["fast"]["cost_full_forwards_tokens"] == pytest.approx(2 + 2 * 4 / 3665)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--load-in-4bit"], "--load-in-4bit needs --device cuda (got --device cpu)"),
        (["--batch-sizes", "1,0"], "--batch-sizes must be >= 1, got [1, 0]"),
        (["--gen-length", "8", "--block-length", "3"], "--gen-length (8) must be a multiple of --block-length (3)"),
        (["--methods", "exact,warp"], "unknown methods ['warp']"),
    ],
)
def test_bad_options_are_named(flags, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, *flags], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_quantise_decoder_replaces_exactly_the_decoder_linears():
    # The benchmark refuses --load-in-4bit/8bit on the CPU (it measures GPU memory), but its quantiser is the
    # same code on both; bitsandbytes 0.50 runs NF4 and int8 on the CPU (docs/quantization.md).
    pytest.importorskip("bitsandbytes")
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    import bench_generate

    args = bench_generate._parser().parse_args([*SMALL, "--image", "none", "--dtype", "bfloat16"])
    for bits, kind, dtype in ((4, "Linear4bit", torch.uint8), (8, "Linear8bitLt", torch.int8)):
        model = bench_generate.build_model(args)
        assert bench_generate.quantise_decoder(model, bits, torch.bfloat16) == 7  # q, k, v, o, gate, up, down
        decoder = [type(m).__name__ for m in model.language_model.layers.modules() if "Linear" in type(m).__name__]
        assert decoder == [kind] * 7
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
        assert model.language_model.layers[0].mlp.down_proj.weight.dtype == dtype
        out = model.diffusion_generate(**bench_generate.prompt_inputs(model, args), steps=2, max_new_tokens=4,
                                       block_length=4)  # fmt: skip
        assert out.shape == (1, 24 + 4)


@pytest.mark.slow
def test_dllm_cache_method_reports_the_positions_it_recomputes(tmp_path):
    # Text only (24 prompt tokens + 8 answer tokens = 32), one block of 8 steps, the official 25/7/0.25: pass 1
    # is a full forward (32), passes 2-7 recompute int(8 x 0.25) = 2 answer positions each, pass 8 refreshes the
    # answer (8): (32 + 6 x 2 + 8) / 32 = 1.625 full forwards; exact mode 8.
    summary = run_bench(tmp_path, "--image", "none", "--steps", "8", "--gen-length", "8", "--block-length", "8",
                        "--methods", "exact,dllm_cache")  # fmt: skip
    exact, cached = summary["methods"]["exact"], summary["methods"]["dllm_cache"]
    assert exact["forward_passes"] == cached["forward_passes"] == 8
    assert exact["cost_full_forwards_tokens"] == 8.0
    assert cached["cost_full_forwards_tokens"] == pytest.approx(52 / 32)
    assert cached["module_calls"]["decoder"] == 8 and len(cached["answer_ids"]) == 8
