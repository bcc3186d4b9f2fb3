"""Benchmark `diffusion_generate` (exact and fast modes) against a reference loop mirroring the official sampler.

The reference (`reference_generate`) is written from the official `generate_with_embeds` (SPEC section 7):
full-sequence logits at every step, mask detection by embedding comparison, suppression over the whole
`(1, L, V)` logits and a float64 softmax over all of them. Exact mode computes logits only where a token can
be committed; the fast modes (docs/generation.md, "Fast decoding") also cache keys/values across steps and/or
commit every token above a confidence threshold. All run on the same random-initialised model with the real
vocabulary (126464) and a real-shaped prompt: one 853x1280 image (3633 image tokens) plus 24 text tokens, as
in the official demo.

Methods (`--methods`): reference, exact, prefix, dual, threshold, prompt_once (dual cache, prompt once per
call), fast (`LladaVGenerationConfig.fast`), fast_prompt_once.
Each runs in its own subprocess so peak memory is measured separately (peak RSS of the process and the peak
RSS increase during generation, sampled every 2 ms). Reported per method, from one run: wall time and speedup
vs the reference, forward passes, answer tokens per forward, cost in full forwards (decoder tokens / (prompt +
answer), and wall time / one full forward of the model measured in the same process), peak RSS and its ratio
to the reference, and answer tokens equal to exact mode's.

`--batch-throughput`: one batch of 8 demo-task questions vs 8 single calls, exact mode, on a demo-shaped
random model. `--demo-accuracy N`: exact vs fast accuracy on N held-out questions of the trained demo model
(`llada_v/demo/checkpoint/`, or `--demo-model DIR`); skipped while no checkpoint exists.

    python benchmarks/bench_generate.py --threads 1 --batch-throughput --demo-accuracy 200   # ~11 min
    python benchmarks/bench_generate.py --steps 16 --gen-length 32 --block-length 16 --methods reference,exact
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the parity oracle: tests/official_sampler.py
from official_sampler import reference_generate  # noqa: E402
SHARED = Path(os.environ.get("LLADA_V_SHARED", REPO.parent / "shared"))
IMAGE_PLACEHOLDER = -200
# The official demo prompt around one image (golden case `test_jpg_s16_g32_b32`): system + user turn, then
# the assistant header; -200 is the image placeholder.
DEMO_PROMPT = [
    126080, 126346, 9125, 126347, 271, 40, 41, 42, 126348, 126346, 882, 126347, 271,
    IMAGE_PLACEHOLDER, 198, 5501, 7664, 279, 2217, 13, 126348, 126346, 598, 126347, 271,
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Benchmark plumbing


def build_model(out_dir: Path, hidden: int, layers: int, heads: int, seed: int) -> None:
    from llada_v import LladaVConfig, LladaVModel

    config = LladaVConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=heads,
        ),  # the real vocabulary (126464) and special ids
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
    )
    torch.manual_seed(seed)
    LladaVModel(config).save_pretrained(out_dir)


def prompt_inputs(model) -> dict:
    """The demo prompt with one 853x1280 image (the official demo image when the golden fixtures exist)."""
    from PIL import Image

    from llada_v.image_processing_llada_v import LladaVImageProcessor

    path = SHARED / "golden" / "images" / "test.jpg"
    if path.is_file():
        image = Image.open(path)
    else:
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (1280, 853, 3), dtype=np.uint8))
    processed = LladaVImageProcessor()(image)
    (n_tokens,) = processed["num_image_tokens"]
    ids = []
    for token in DEMO_PROMPT:
        ids += [model.config.image_token_id] * n_tokens if token == IMAGE_PLACEHOLDER else [token]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": processed["pixel_values"],
        "image_sizes": processed["image_sizes"],
    }


class PeakRSS:
    """Samples this process's resident set size in a thread; `peak` is the highest value seen (bytes)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


# ----------------------------------------------------------------------------------------------------------
# Methods: the reference loop, exact `diffusion_generate`, each acceleration alone, the fast preset


FAST = "fast"  # LladaVGenerationConfig.fast(model.generation_config)
METHODS: dict[str, dict | None] = {
    "reference": None,  # the official loop
    "exact": {},  # diffusion_generate defaults (early exit on, as in the official loop)
    "prefix": {"kv_cache": "prefix"},
    "dual": {"kv_cache": "dual"},
    "threshold": {"confidence_threshold": 0.9},
    "prompt_once": {"kv_cache": "dual", "kv_cache_prompt_refresh": "once"},
    FAST: {},
    "fast_prompt_once": {"kv_cache_prompt_refresh": "once"},  # the preset + the prompt encoded once per call
}
DEFAULT_METHODS = ("reference", "exact", "prefix", "dual", "threshold", "prompt_once", FAST, "fast_prompt_once")


def _generation_config(model, method: str, settings: dict):
    from llada_v import LladaVGenerationConfig

    options = {**METHODS[method], **settings}
    if method.startswith(FAST):
        return LladaVGenerationConfig.fast(model.generation_config, **options)
    config = copy.deepcopy(model.generation_config)
    config.update(**options)
    return config


@torch.no_grad()
def full_forward_seconds(model, inputs: dict, answer_length: int) -> float:
    """The cost unit, the floor of any method: read the prompt once. One forward of the whole model over
    prompt + answer (all masks): image encoding, the decoder over every position, logits at the answer only."""
    start = time.perf_counter()
    embeds = model.embed_multimodal(inputs["input_ids"], inputs.get("pixel_values"), inputs.get("image_sizes"))
    mask = model.get_input_embeddings().weight[model.config.mask_token_id]
    canvas = torch.cat((embeds, mask.expand(embeds.shape[0], answer_length, -1)), dim=1)  # (B, P + N, D)
    model(inputs_embeds=canvas, logits_to_keep=torch.arange(embeds.shape[1], canvas.shape[1]))
    return time.perf_counter() - start


def worker(method: str, model_dir: str, args: argparse.Namespace) -> dict:
    """Runs one method in this process and returns its measurements."""
    from llada_v import LladaVModel

    torch.set_num_threads(args.threads)
    model = LladaVModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = prompt_inputs(model)
    prompt_len = int(inputs["input_ids"].shape[1])
    stops = None if args.stop_token_id is None else [[args.stop_token_id]]
    settings = dict(steps=args.steps, max_new_tokens=args.gen_length, block_length=args.block_length)
    sampler = PeakRSS()
    baseline = sampler.rss()
    with sampler:
        start = time.perf_counter()
        if method == "reference":
            with torch.no_grad():
                embeds = model.embed_multimodal(
                    inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"]
                )  # images encoded once per call, as the official generate does
            tokens, passes = reference_generate(
                model, embeds, steps=args.steps, gen_length=args.gen_length, block_length=args.block_length,
                stop_token_ids=stops, vocab_limit=model.config.tokenizer_vocab_size,
            )  # fmt: skip
            decoder_tokens = passes * (prompt_len + args.gen_length)
        else:
            config = _generation_config(model, method, {**settings, "stop_token_ids": stops})
            out = model.diffusion_generate(**inputs, generation_config=config, return_dict_in_generate=True)
            tokens = out.answer_ids()[0]
            passes, decoder_tokens = out.num_forward_passes, out.num_decoder_tokens
        seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unit = full_forward_seconds(model, inputs, args.gen_length)
    return {
        "method": method,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss,
        "generation_peak_increase_bytes": sampler.peak - baseline,
        "forward_passes": passes,
        "decoder_tokens": decoder_tokens,
        "full_forward_seconds": unit,
        "tokens": tokens,
        "prompt_length": prompt_len,
    }


# ----------------------------------------------------------------------------------------------------------
# Batch throughput: one batch of 8 vs 8 single calls (exact mode)


def batch_worker(args: argparse.Namespace) -> dict:
    """Eight demo-task questions (rendered scenes, different sizes, left padding) on a demo-shaped random model:
    one call with the batch vs one call per question, same settings; returns both times and whether the
    answers agree."""
    from llada_v import LladaVGenerationConfig, LladaVModel
    from llada_v.demo.model import build_demo_processor, build_demo_tokenizer, demo_config
    from llada_v.demo.task import make_sample

    torch.set_num_threads(args.threads)
    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer)
    torch.manual_seed(args.seed)
    model = LladaVModel(config).eval().to(args.device)
    model.generation_config = LladaVGenerationConfig.from_model_config(config)
    processor = build_demo_processor(config, tokenizer)
    samples = [make_sample(f"bench-{i}") for i in range(args.batch_size)]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["qa"][0][0]}]}],
            add_generation_prompt=True,
        )
        for s in samples
    ]
    settings = dict(
        steps=args.batch_steps, max_new_tokens=args.batch_gen_length, block_length=args.batch_gen_length,
        return_dict_in_generate=True,
    )  # fmt: skip

    def run(indices):
        inputs = processor(images=[[samples[i]["image"]] for i in indices], text=[texts[i] for i in indices])
        inputs = inputs.to(args.device)
        out = model.diffusion_generate(**inputs, **settings)
        return out.answer_ids(), out.prompt_length

    run([0])  # warm-up
    single_seconds = batch_seconds = float("inf")
    for _ in range(args.batch_repeats):  # best of a few: the calls are short and the machine is shared
        start = time.perf_counter()
        singles = [run([i])[0][0] for i in range(args.batch_size)]
        single_seconds = min(single_seconds, time.perf_counter() - start)
        start = time.perf_counter()
        batched, padded_len = run(list(range(args.batch_size)))
        batch_seconds = min(batch_seconds, time.perf_counter() - start)
    return {
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads",
        "padded_prompt_length": padded_len,
        "single_calls_seconds": single_seconds,
        "batch_seconds": batch_seconds,
        "throughput_ratio": single_seconds / batch_seconds,
        "identical_answers": singles == batched,
        "settings": {k: v for k, v in settings.items() if k != "return_dict_in_generate"},
        "model": {"hidden": config.text_config.hidden_size, "layers": config.text_config.num_hidden_layers,
                  "vocab": config.text_config.vocab_size},
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Demo accuracy (hook): exact vs the fast preset on the trained demo model's held-out set


def demo_accuracy(args: argparse.Namespace) -> dict:
    """Exact-match accuracy of exact mode and of the fast preset on `args.demo_accuracy` held-out questions of
    the trained demo model (`llada_v/demo/checkpoint/`, or `--demo-model`), with `llada_v.demo.app.evaluate`.

    The checkpoint is loaded with this package's classes (not its exported remote code), so the sampler measured
    is the one in this tree.
    """
    from llada_v import LladaVGenerationConfig, LladaVModel, LladaVProcessor
    from llada_v.demo.app import evaluate
    from llada_v.demo.model import demo_model_dir

    path = Path(args.demo_model) if args.demo_model else demo_model_dir()
    if not (path / "config.json").is_file():
        return {"skipped": f"no trained demo checkpoint at {path} yet"}
    torch.set_num_threads(args.threads)
    model = LladaVModel.from_pretrained(path, dtype=torch.float32).eval().to(args.device)
    processor = LladaVProcessor.from_pretrained(path)
    results = {}
    for name, config in (
        ("exact", model.generation_config),
        ("fast", LladaVGenerationConfig.fast(model.generation_config)),
    ):
        start = time.perf_counter()
        result = evaluate(model, processor, args.demo_seed, args.demo_accuracy, generation_config=config)
        results[name] = {"accuracy": result["accuracy"], "per_type": result["per_type"],
                         "seconds": time.perf_counter() - start}  # fmt: skip
    results["n"] = args.demo_accuracy
    results["difference_points"] = 100 * (results["fast"]["accuracy"] - results["exact"]["accuracy"])
    return results


# ----------------------------------------------------------------------------------------------------------
# Driver


def _subprocess(args_list: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"worker {args_list[0]} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(tokens: list[int], exact: list[int]) -> str:
    same = sum(a == b for a, b in zip(tokens, exact))
    return f"{same}/{max(len(tokens), len(exact))}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--stop-token-id", type=int, default=None,
                        help="a one-token stop sequence for every method (default: none, the whole answer is decoded)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} ('none' for no method)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-throughput", action="store_true",
                        help="also time one batch of --batch-size demo questions vs one call per question")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-gen-length", type=int, default=4)
    parser.add_argument("--batch-steps", type=int, default=4)
    parser.add_argument("--batch-repeats", type=int, default=3, help="best of this many timings of each")
    parser.add_argument("--demo-accuracy", type=int, default=0, metavar="N",
                        help="also compare exact vs fast accuracy on N held-out demo questions (needs the trained "
                             "demo checkpoint)")
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--demo-model", help="demo checkpoint folder (default: llada_v/demo/checkpoint)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where --batch-throughput and --demo-accuracy run (the methods always run on CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        if args.worker == "batch":
            print(json.dumps(batch_worker(args)))
        elif args.worker == "demo":
            print(json.dumps(demo_accuracy(args)))
        else:
            print(json.dumps(worker(args.worker, args.model_dir, args)))
        return {}

    methods = [] if args.methods == "none" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    forwarded = [
        f"--hidden={args.hidden}", f"--layers={args.layers}", f"--heads={args.heads}", f"--steps={args.steps}",
        f"--gen-length={args.gen_length}", f"--block-length={args.block_length}", f"--threads={args.threads}",
        f"--seed={args.seed}", f"--batch-size={args.batch_size}", f"--batch-gen-length={args.batch_gen_length}",
        f"--batch-steps={args.batch_steps}", f"--batch-repeats={args.batch_repeats}",
        f"--demo-accuracy={args.demo_accuracy}", f"--demo-seed={args.demo_seed}", f"--device={args.device}",
        *([f"--stop-token-id={args.stop_token_id}"] if args.stop_token_id is not None else []),
        *([f"--demo-model={args.demo_model}"] if args.demo_model else []),
    ]  # fmt: skip
    results: dict[str, dict] = {}
    if methods:
        with tempfile.TemporaryDirectory() as tmp:
            build_model(Path(tmp), args.hidden, args.layers, args.heads, args.seed)
            for method in methods:
                results[method] = _subprocess([f"--worker={method}", f"--model-dir={tmp}", *forwarded])
                print(f"  {method}: {results[method]['seconds']:.1f} s", file=sys.stderr, flush=True)

    summary: dict = {
        "settings": {
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": 126464,
            "steps": args.steps, "gen_length": args.gen_length, "block_length": args.block_length,
            "stop_token_id": args.stop_token_id, "threads": args.threads, "torch": torch.__version__,
        },
        "methods": {},
    }  # fmt: skip
    gib = 1024**3
    if results:
        first = next(iter(results.values()))
        prompt_len = first["prompt_length"]
        ref = results.get("reference")
        exact_tokens = results["exact"]["tokens"] if "exact" in results else None
        print(f"prompt {prompt_len} tokens, answer {args.gen_length}, steps {args.steps}, block {args.block_length}, "
              f"stop {args.stop_token_id}; hidden {args.hidden}, {args.layers} layers, vocab 126464, "
              f"{args.threads} threads")  # fmt: skip
        header = (f"{'method':<17} {'wall s':>7} {'speedup':>8} {'forwards':>8} {'tok/fwd':>7} {'cost tok':>8} "
                  f"{'cost time':>9} {'peak GiB':>8} {'mem ratio':>9} {'vs exact':>8}")  # fmt: skip
        print(header)
        for name, r in results.items():
            row = {
                "seconds": r["seconds"],
                "speedup_vs_reference": ref["seconds"] / r["seconds"] if ref else None,
                "forward_passes": r["forward_passes"],
                "tokens_per_forward": len(r["tokens"]) / max(1, r["forward_passes"]),
                "answer_tokens": len(r["tokens"]),
                # Cost in units of one full forward over prompt + answer: decoder tokens, and wall time.
                "cost_full_forwards_tokens": r["decoder_tokens"] / (prompt_len + args.gen_length),
                "cost_full_forwards_time": r["seconds"] / r["full_forward_seconds"],
                "full_forward_seconds": r["full_forward_seconds"],
                "peak_rss_bytes": r["peak_rss_bytes"],
                "peak_rss_ratio_vs_reference": r["peak_rss_bytes"] / ref["peak_rss_bytes"] if ref else None,
                "generation_peak_increase_bytes": r["generation_peak_increase_bytes"],
                "agreement_with_exact": _agreement(r["tokens"], exact_tokens) if exact_tokens is not None else None,
                "answer_ids": r["tokens"],
            }
            summary["methods"][name] = row
            speedup = f"{row['speedup_vs_reference']:.1f}x" if ref else "-"
            mem = f"{row['peak_rss_ratio_vs_reference']:.3f}" if ref else "-"
            print(f"{name:<17} {r['seconds']:>7.1f} {speedup:>8} {r['forward_passes']:>8} "
                  f"{row['tokens_per_forward']:>7.2f} {row['cost_full_forwards_tokens']:>8.2f} "
                  f"{row['cost_full_forwards_time']:>9.2f} {r['peak_rss_bytes'] / gib:>8.2f} {mem:>9} "
                  f"{row['agreement_with_exact'] or '-':>8}")  # fmt: skip
        print("cost tok: decoder tokens / (prompt + answer); cost time: wall time / one full forward "
              f"({first['full_forward_seconds']:.2f} s in the first worker); vs exact: answer tokens equal to exact "
              "mode's at the same position")  # fmt: skip
    if args.batch_throughput:
        batch = _subprocess(["--worker=batch", *forwarded])
        summary["batch_throughput"] = batch
        print(f"batch throughput on {batch['device']} ({batch['batch_size']} demo questions, exact mode, demo-shaped random model "
              f"hidden {batch['model']['hidden']}, {batch['model']['layers']} layers, vocab {batch['model']['vocab']}, "
              f"padded prompt {batch['padded_prompt_length']}): {batch['batch_size']} single calls "
              f"{batch['single_calls_seconds']:.2f} s, one batch {batch['batch_seconds']:.2f} s -> "
              f"{batch['throughput_ratio']:.1f}x; identical answers: {batch['identical_answers']}")  # fmt: skip
    if args.demo_accuracy:
        demo = _subprocess(["--worker=demo", *forwarded])
        summary["demo_accuracy"] = demo
        if "skipped" in demo:
            print(f"demo accuracy: skipped ({demo['skipped']})")
        else:
            print(f"demo accuracy on {demo['n']} held-out questions: exact {100 * demo['exact']['accuracy']:.1f}% "
                  f"({demo['exact']['seconds']:.1f} s), fast {100 * demo['fast']['accuracy']:.1f}% "
                  f"({demo['fast']['seconds']:.1f} s); difference {demo['difference_points']:+.1f} points")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
