"""CUDA smoke test: load a converted checkpoint in bfloat16, 4-bit and 8-bit and run `diffusion_generate`.

    python scripts/cuda_smoke_test.py [--model PATH_OR_ID] [--device cuda] [--json results.json]

Without `--model` two tiny random checkpoints are built in a temporary folder (no downloads): one shaped like the
embedded demo model (language model 64 wide) and one shaped like the golden official tiny checkpoint (32 wide,
too narrow for bitsandbytes' packed CPU 4-bit kernel: `from_pretrained` keeps such layers on the portable path).
For every checkpoint and mode the script checks that
- the vision tower, projector, image newline and lm_head are not quantised, and the decoder linears are;
- an image prompt and a left-padded batch of two prompts generate (rows must equal the single-prompt runs in
  float32; in bfloat16 and with bitsandbytes kernels the batch shape may change the rounding, so it is reported);
- the fast preset runs;
and prints one line per check. Exit status: 0 all passed (or skipped: no CUDA), 1 a check failed.
`--device cpu` runs the same checks on CPU (a dry run of the script itself).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from PIL import Image

UNQUANTISED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "lm_head")


def build_tiny_checkpoint(path: Path, width: int) -> Path:
    """A random-weight LLaDA-V with the demo tokenizer/processor, language model `width` wide, sampler 8/8/8."""
    from llada_v import LladaVGenerationConfig, LladaVModel
    from llada_v.demo.model import build_demo_processor, build_demo_tokenizer, demo_config
    from llada_v.demo.train import save_demo

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer, hidden_size=width, intermediate_size=3 * width, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LladaVModel(config).eval()
    model.generation_config = LladaVGenerationConfig.from_model_config(config)
    model.generation_config.update(max_new_tokens=8, steps=8, block_length=8)
    save_demo(model, build_demo_processor(config, tokenizer), path)
    return path


def check_quantisation(model, mode: str) -> str:
    kinds = {name: type(module).__name__ for name, module in model.named_modules() if "Linear" in type(module).__name__}
    quantised = sorted(name for name, kind in kinds.items() if kind != "Linear")
    wrong = [name for name in quantised if name.startswith(UNQUANTISED_PREFIXES)]
    if wrong:
        raise AssertionError(f"quantised although they must not be: {wrong[:5]}")
    if mode in ("4bit", "8bit"):
        expected = "Linear4bit" if mode == "4bit" else "Linear8bitLt"
        decoder = [name for name in kinds if ".layers." in name and not name.startswith("vision_tower.")]
        not_quantised = [name for name in decoder if kinds[name] != expected]
        if not decoder or not_quantised:
            raise AssertionError(f"decoder linears not {expected}: {not_quantised[:5]}")
        return f"{len(quantised)} decoder linears {expected}; vision, projector, lm_head unquantised"
    dtypes = {p.dtype for n, p in model.named_parameters() if n.startswith("language_model.")}
    return f"language model dtypes {sorted(str(d) for d in dtypes)}; vision tower {model.vision_tower.dtype}"


def run_checks(name: str, model_id: str, device: str, mode: str) -> list[dict]:
    from llada_v.inference import chat_prompt, generate_texts, generation_config_for, load_pretrained, user_message

    results = []

    def record(check: str, fn) -> None:
        started = time.time()
        try:
            detail = fn()
            results.append(
                {
                    "checkpoint": name,
                    "mode": mode,
                    "check": check,
                    "ok": True,
                    "detail": detail,
                    "seconds": round(time.time() - started, 2),
                }
            )
        except Exception as err:  # noqa: BLE001 - a smoke test reports every failure and goes on
            results.append(
                {
                    "checkpoint": name,
                    "mode": mode,
                    "check": check,
                    "ok": False,
                    "detail": f"{type(err).__name__}: {err}",
                    "trace": traceback.format_exc(limit=6),
                    "seconds": round(time.time() - started, 2),
                }
            )

    state: dict = {}

    def load():
        quantization = mode if mode in ("4bit", "8bit") else None
        dtype = "bfloat16" if mode in ("bfloat16", "4bit", "8bit") else mode
        state["model"], state["processor"] = load_pretrained(
            model_id, dtype=dtype, device=device, quantization=quantization
        )
        return check_quantisation(state["model"], mode)

    record("load", load)
    if "model" not in state:
        return results
    model, processor = state["model"], state["processor"]
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (90, 50), (0, 0, 255))
    prompts = [
        chat_prompt(processor, [user_message("What color is the circle?", 1)]),
        chat_prompt(processor, [user_message("How many shapes are there in this picture?", 1)]),
    ]
    config = generation_config_for(model.generation_config, {})

    def single():
        answers, output = generate_texts(model, processor, prompts[:1], [[red]], config)
        state["single"] = answers[0]
        if not torch.isfinite(output.sequences.float()).all():
            raise AssertionError("non-finite ids")
        return f"answer {answers[0]!r} in {output.num_forward_passes} passes"

    def batch():
        answers, _ = generate_texts(model, processor, prompts, [[red], [blue]], config)
        alone, _ = generate_texts(model, processor, prompts[1:], [[blue]], config)
        same = [answers[0] == state.get("single"), answers[1] == alone[0]]
        if mode == "float32" and not all(same):
            raise AssertionError(f"batch rows differ from single runs: {answers} vs {state.get('single')}, {alone}")
        return f"rows equal single runs: {same}"

    def fast():
        fast_config = generation_config_for(model.generation_config, {}, fast=True)
        answers, output = generate_texts(model, processor, prompts, [[red], [blue]], fast_config)
        return f"{output.num_forward_passes} passes: {answers}"

    record("generate", single)
    record("batch of 2 (left padding)", batch)
    record("fast preset", fast)
    del state["model"]
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="converted checkpoint (default: build two tiny ones)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--modes", default="bfloat16,4bit,8bit", help="comma-separated: float32,bfloat16,4bit,8bit")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("SKIP: CUDA is not available on this machine (use --device cpu for a dry run)")
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    print(
        f"torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name(args.device)})" if args.device.startswith("cuda") else "")
    )
    with tempfile.TemporaryDirectory(prefix="llada_v_smoke_") as tmp:
        if args.model is not None:
            checkpoints = {Path(args.model).name or args.model: args.model}
        else:
            checkpoints = {
                "demo-shaped (64 wide)": str(build_tiny_checkpoint(Path(tmp) / "w64", 64)),
                "golden-shaped (32 wide)": str(build_tiny_checkpoint(Path(tmp) / "w32", 32)),
            }
        results = []
        for name, path in checkpoints.items():
            for mode in modes:
                results.extend(run_checks(name, path, args.device, mode))
    for r in results:
        status = "ok  " if r["ok"] else "FAIL"
        print(f"{status} {r['checkpoint']:<24} {r['mode']:<9} {r['check']:<28} {r['seconds']:>6.2f}s  {r['detail']}")
        if not r["ok"]:
            print(r["trace"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
