"""Benchmark `diffusion_generate` (exact and fast modes) against a reference loop mirroring the official sampler.

The reference (`reference_generate`) is written from the official `generate_with_embeds` (SPEC section 7):
full-sequence logits at every step, mask detection by embedding comparison, suppression over the whole
`(1, L, V)` logits and a float64 softmax over all of them. Exact mode computes logits only where a token can
be committed; the fast modes (docs/generation.md, "Fast decoding") also cache keys/values across steps and/or
commit every token above a confidence threshold. All run on the same random-initialised model with the real
vocabulary (126464) and a real-shaped prompt: one 853x1280 image (3633 image tokens) plus 24 text tokens, as
in the official demo.

Methods (`--methods`): reference, exact, prefix, dual, threshold, prompt_once (dual cache, prompt once per
call), fast (`LladaVGenerationConfig.fast`), fast_prompt_once, dllm_cache (dLLM-Cache at the official demo's
25/7/0.25; its decoder tokens are the query positions each pass recomputes).
Each runs in its own subprocess so peak memory is measured separately (peak RSS of the process and the peak
RSS increase during generation, sampled every 2 ms). Reported per method, from one run: wall time and speedup
vs the reference, forward passes, answer tokens per forward, cost in full forwards (decoder tokens / (prompt +
answer), and wall time / one full forward of the model measured in the same process), peak RSS and its ratio
to the reference, and answer tokens equal to exact mode's.

`--batch-throughput`: one batch of 8 demo-task questions vs 8 single calls, exact mode, on a demo-shaped
random model. `--demo-accuracy N`: exact vs fast accuracy on N held-out questions of the trained demo model
(`llada_v/demo/checkpoint/`, or `--demo-model DIR`); skipped while no checkpoint exists.

`--config released` builds the model from `LladaVConfig()` (the released 8B architecture: hidden 4096, 32 layers,
32 heads, vocabulary 126464, SigLIP so400m 26 layers) with random weights created directly on `--device` in
`--dtype` (`_from_config(..., dtype=)` under a `torch.device` context: no float32 copy on the host; the host's
peak RSS while building is reported). `--layers`, `--vision-layers` (and `--hidden`, `--heads`, `--vision-hidden`,
`--vision-heads` for tests) shrink it. Each method then reports the time split of the call (vision tower +
projector once, decoder, LM head, the rest = sampling and bookkeeping; module hooks, synchronised on CUDA), peak
host RSS and, on CUDA, peak GPU memory; `--batch-sizes 1,8,32` repeats the request per row.
`--load-in-4bit/--load-in-8bit` quantise the decoder's linear layers with bitsandbytes (CUDA only).

    python benchmarks/bench_generate.py --threads 1 --batch-throughput --demo-accuracy 200   # ~11 min
    python benchmarks/bench_generate.py --steps 16 --gen-length 32 --block-length 16 --methods reference,exact
    python benchmarks/bench_generate.py --config released --device cuda --dtype bfloat16 \
        --steps 128 --gen-length 128 --block-length 32 --warmup    # the released 8B shape, official demo settings
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RELEASED_IMAGE = SHARED / "reference" / "images" / "test.jpg"  # the official demo image, 853x1280


def model_config(args: argparse.Namespace):
    """The benchmarked architecture: the tiny default (the real vocabulary, small decoder and SigLIP), or
    `LladaVConfig()` (the released 8B shape) with only the sizes given on the command line changed."""
    from llada_v import LladaVConfig

    if args.config == "tiny":
        hidden = args.hidden or 256
        text = dict(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=args.layers or 4,
                    num_attention_heads=args.heads or 4)  # fmt: skip
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=args.vision_layers or 2,
                      num_attention_heads=2)  # fmt: skip
        return LladaVConfig(text_config=text, vision_config=vision)  # the real vocabulary (126464) and special ids
    text, vision = {}, {}
    if args.layers is not None:
        text["num_hidden_layers"] = args.layers
    if args.hidden is not None:  # the released ratio: intermediate = 3 x hidden (12288 / 4096)
        text.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden)
    if args.heads is not None:
        text["num_attention_heads"] = args.heads
    if args.vision_layers is not None:
        vision["num_hidden_layers"] = args.vision_layers
    if args.vision_hidden is not None:
        vision.update(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden)
    if args.vision_heads is not None:
        vision["num_attention_heads"] = args.vision_heads
    return LladaVConfig(text_config=text or None, vision_config=vision or None)


def quantise_decoder(model, bits: int, compute_dtype: torch.dtype) -> int:
    """Replaces every linear layer of the decoder layers by a bitsandbytes one (NF4 with `compute_dtype`, or
    LLM.int8), as `from_pretrained(quantization_config=...)` does for this model (docs/quantization.md: the vision
    tower, projector, embeddings and lm_head stay unquantised). Weights pass through the host one layer at a
    time (bitsandbytes quantises on the move to the GPU). Returns the number of replaced layers."""
    import bitsandbytes as bnb

    replaced = 0
    for layer in model.language_model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                device, weight = child.weight.device, child.weight.data.cpu()
                if bits == 4:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                            compute_dtype=compute_dtype, quant_type="nf4", device="meta")  # fmt: skip
                    new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
                else:
                    new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                              has_fp16_weights=False, threshold=6.0, device="meta")  # fmt: skip
                    new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data.cpu(), requires_grad=False)
                setattr(parent, name, new.to(device))
                replaced += 1
    return replaced


def build_model(args: argparse.Namespace):
    """Random weights created directly on `args.device` in `args.dtype` (never a float32 copy on the host)."""
    from llada_v import LladaVGenerationConfig, LladaVModel

    config = model_config(args)
    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    with torch.device(args.device):
        model = LladaVModel._from_config(config, dtype=dtype, attn_implementation=args.attn_implementation)
    model.generation_config = LladaVGenerationConfig.from_model_config(config)
    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    if bits:
        quantise_decoder(model, bits, dtype)
    return model.eval()


def request_image(args: argparse.Namespace):
    """`--image`: a path, 'none' (a text-only prompt) or the default, the official demo image (a random 853x1280
    image where the fixtures are absent)."""
    from PIL import Image

    if args.image == "none":
        return None
    path = Path(args.image) if args.image else RELEASED_IMAGE
    if path.is_file():
        return Image.open(path)
    if args.image:
        raise SystemExit(f"--image {args.image}: no such file")
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (1280, 853, 3), dtype=np.uint8))


def prompt_inputs(model, args: argparse.Namespace, batch_size: int = 1) -> dict:
    """The official demo prompt (`DEMO_PROMPT`) around one image, `batch_size` identical rows, on the model's
    device: with test.jpg 24 text tokens + 3633 image tokens = 3657 (golden case `test_jpg`)."""
    from llada_v.image_processing_llada_v import LladaVImageProcessor

    image = request_image(args)
    ids, inputs = list(DEMO_PROMPT), {}
    if image is None:
        ids = [t for t in ids if t != IMAGE_PLACEHOLDER]
    else:
        processed = LladaVImageProcessor()([[image]] * batch_size)
        n_tokens = processed["num_image_tokens"][0]
        ids = [t2 for t in ids for t2 in ([model.config.image_token_id] * n_tokens if t == IMAGE_PLACEHOLDER else [t])]
        inputs = {k: processed[k] for k in ("pixel_values", "image_sizes", "image_layouts", "image_num_crops")}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    inputs["input_ids"] = torch.tensor([ids] * batch_size)
    return {k: v.to(model.device) for k, v in inputs.items()}


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


class ModuleTimers:
    """Wall time of the parts of a call, with forward hooks (synchronised on CUDA, so GPU work is charged to the
    part that launched it): `vision` from the SigLIP embeddings to the projector's output (the model runs the
    tower's embeddings and encoder layers itself, docs/architecture.md section 2), the decoder (`language_model`)
    and `lm_head`; `calls` counts the calls of each part."""

    PARTS = {
        "vision": ("vision_tower.embeddings", "multi_modal_projector"),
        "decoder": ("language_model", "language_model"),
        "lm_head": ("lm_head", "lm_head"),
    }

    def __init__(self, model):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.calls = dict.fromkeys(self.PARTS, 0)
        self._cuda = model.device.type == "cuda"
        self._handles, self._start = [], {}
        for part, (first, last) in self.PARTS.items():
            self._handles.append(model.get_submodule(first).register_forward_pre_hook(self._enter(part)))
            self._handles.append(model.get_submodule(last).register_forward_hook(self._exit(part)))

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, part):
        def hook(module, args):
            self._start[part] = self._now()

        return hook

    def _exit(self, part):
        def hook(module, args, output):
            self.seconds[part] += self._now() - self._start.pop(part)
            self.calls[part] += 1

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


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
    "dllm_cache": {"dllm_cache": {}},  # dLLM-Cache at the official demo's settings (25/7/0.25)
}
DEFAULT_METHODS = (
    "reference", "exact", "prefix", "dual", "threshold", "prompt_once", FAST, "fast_prompt_once", "dllm_cache",
)  # fmt: skip


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
    images = {k: v for k, v in inputs.items() if k != "input_ids"}
    embeds = model.embed_multimodal(inputs["input_ids"], **images)
    mask = model.get_input_embeddings().weight[model.config.mask_token_id]
    canvas = torch.cat((embeds, mask.expand(embeds.shape[0], answer_length, -1)), dim=1)  # (B, P + N, D)
    model(inputs_embeds=canvas, logits_to_keep=torch.arange(embeds.shape[1], canvas.shape[1]))
    _synchronize(model)
    return time.perf_counter() - start


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def run_method(model, method: str, inputs: dict, args: argparse.Namespace, steps: int, gen_length: int):
    """One generation call; returns (answer ids per row, forward passes, decoder tokens)."""
    stops = None if args.stop_token_id is None else [[args.stop_token_id]]
    block = min(args.block_length, gen_length)
    prompt_len = int(inputs["input_ids"].shape[1])
    if method == "reference":
        images = {k: v for k, v in inputs.items() if k != "input_ids"}
        embeds = model.embed_multimodal(inputs["input_ids"], **images)  # once per call, as the official generate
        tokens, passes = reference_generate(
            model, embeds, steps=steps, gen_length=gen_length, block_length=block,
            stop_token_ids=stops, vocab_limit=model.config.tokenizer_vocab_size,
        )  # fmt: skip
        return [tokens], passes, passes * (prompt_len + gen_length)
    settings = dict(steps=steps, max_new_tokens=gen_length, block_length=block, stop_token_ids=stops)
    config = _generation_config(model, method, settings)
    out = model.diffusion_generate(**inputs, generation_config=config, return_dict_in_generate=True)
    return out.answer_ids(), out.num_forward_passes, out.num_decoder_tokens


def _build_measured(args: argparse.Namespace):
    """Builds the model while sampling the host's RSS: returns (model, build facts)."""
    with PeakRSS() as host:
        start = time.perf_counter()
        model = build_model(args)
        _synchronize(model)
        seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    text, vision = model.config.text_config, model.config.vision_config
    facts = {"build_seconds": seconds, "build_peak_rss_bytes": host.peak, "parameters": params,
             "weight_bytes": weight_bytes,
             "model": {"hidden": text.hidden_size, "layers": text.num_hidden_layers, "heads": text.num_attention_heads,
                       "vocab": text.vocab_size, "vision_hidden": vision.hidden_size,
                       "vision_layers": vision.num_hidden_layers}}  # fmt: skip
    if model.device.type == "cuda":
        facts["cuda_allocated_after_build_bytes"] = torch.cuda.memory_allocated()
    return model, facts


def worker(method: str, args: argparse.Namespace) -> dict:
    """Runs one method at one batch size (`args.batch_rows`) in this process and returns its measurements."""
    torch.set_num_threads(args.threads)
    model, facts = _build_measured(args)
    inputs = prompt_inputs(model, args, args.batch_rows)
    prompt_len = int(inputs["input_ids"].shape[1])
    if args.warmup:  # kernels, allocator and autotuning outside the timed call: one block, one step
        run_method(model, method, inputs, args, steps=1, gen_length=min(args.block_length, args.gen_length))
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    timers = ModuleTimers(model)
    sampler = PeakRSS()
    baseline = sampler.rss()
    with sampler:
        start = time.perf_counter()
        rows, passes, decoder_tokens = run_method(model, method, inputs, args, args.steps, args.gen_length)
        _synchronize(model)
        seconds = time.perf_counter() - start
    timers.remove()
    result = {
        "method": method, "batch_size": args.batch_rows, "seconds": seconds, **facts,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "generation_peak_increase_bytes": sampler.peak - baseline,
        "forward_passes": passes, "decoder_tokens": decoder_tokens, "tokens": rows[0], "rows": rows,
        "prompt_length": prompt_len, "split_seconds": _split(timers, seconds), "calls": timers.calls,
        "device_name": torch.cuda.get_device_name() if cuda else f"cpu, {args.threads} threads",
    }  # fmt: skip
    if cuda:
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["cuda_generation_peak_increase_bytes"] = torch.cuda.max_memory_allocated() - cuda_before
        result["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if not args.skip_full_forward:
        result["full_forward_seconds"] = full_forward_seconds(model, inputs, args.gen_length)
    return result


def _split(timers: ModuleTimers, total: float) -> dict:
    """The call's wall time by part: vision (SigLIP + projector, once per call), decoder, LM head, and the rest
    (sampling: suppression, argmax, float64 softmax, commits; image feature layout; embedding lookups; Python)."""
    s = timers.seconds
    return {**s, "sampling_and_rest": total - sum(s.values())}


# ----------------------------------------------------------------------------------------------------------
# Batch throughput: one batch of 8 vs 8 single calls (exact mode)


def batch_worker(args: argparse.Namespace) -> dict:
    """Eight demo-task questions (rendered scenes, different sizes, left padding) on a demo-shaped random model:
    one call with the batch vs one call per question, same settings; returns both times and whether the
    answers agree."""
    from llada_v import LladaVGenerationConfig, LladaVModel
    from llada_v.demo.model import build_demo_processor, build_demo_tokenizer, demo_config
    from llada_v.demo.scenes import make_sample

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


def _row(r: dict, ref: dict | None, exact_tokens: list[int] | None, gen_length: int) -> dict:
    prompt_len, passes = r["prompt_length"], max(1, r["forward_passes"])
    split = r["split_seconds"]
    answer_tokens = sum(len(t) for t in r["rows"])
    return {
        "batch_size": r["batch_size"],
        "prompt_length": prompt_len,
        "seconds": r["seconds"],
        "speedup_vs_reference": ref["seconds"] / r["seconds"] if ref else None,
        "forward_passes": r["forward_passes"],
        "tokens_per_forward": len(r["tokens"]) / passes,
        "answer_tokens": answer_tokens,
        "answer_tokens_per_second": answer_tokens / r["seconds"],
        # Cost in units of one full forward over prompt + answer: decoder tokens, and wall time.
        "cost_full_forwards_tokens": r["decoder_tokens"] / r["batch_size"] / (prompt_len + gen_length),
        "cost_full_forwards_time": r["seconds"] / r["full_forward_seconds"] if "full_forward_seconds" in r else None,
        "full_forward_seconds": r.get("full_forward_seconds"),
        "split_seconds": split,
        "per_pass_seconds": {k: split[k] / passes for k in ("decoder", "lm_head", "sampling_and_rest")},
        "module_calls": r["calls"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "peak_rss_ratio_vs_reference": r["peak_rss_bytes"] / ref["peak_rss_bytes"] if ref else None,
        "generation_peak_increase_bytes": r["generation_peak_increase_bytes"],
        "build_peak_rss_bytes": r["build_peak_rss_bytes"],
        "build_seconds": r["build_seconds"],
        "weight_bytes": r["weight_bytes"],
        **{k: r[k] for k in ("cuda_allocated_after_build_bytes", "cuda_peak_allocated_bytes",
                             "cuda_generation_peak_increase_bytes", "cuda_peak_reserved_bytes") if k in r},
        "agreement_with_exact": _agreement(r["tokens"], exact_tokens) if exact_tokens is not None else None,
        "answer_ids": r["tokens"],
        "rows_identical": all(row == r["rows"][0] for row in r["rows"]),
    }  # fmt: skip


def summarise(args: argparse.Namespace, results: dict[str, dict]) -> dict:
    """The results table (printed) and the JSON summary."""
    gib = 1024**3
    summary: dict = {"settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "batch_rows")},
                     "torch": torch.__version__, "methods": {}}  # fmt: skip
    if not results:
        return summary
    first = next(iter(results.values()))
    summary.update(model=first["model"], parameters=first["parameters"], device=first["device_name"])
    ref = results.get("reference")
    exact_tokens = results["exact"]["tokens"] if "exact" in results else None
    m = first["model"]
    print(f"prompt {first['prompt_length']} tokens, answer {args.gen_length}, steps {args.steps}, block "
          f"{args.block_length}, stop {args.stop_token_id}; {args.config} config: hidden {m['hidden']}, {m['layers']} "
          f"layers, {m['heads']} heads, vocab {m['vocab']}, SigLIP {m['vision_hidden']} x {m['vision_layers']} layers; "
          f"{first['parameters'] / 1e9:.3f} B parameters, {args.dtype}, {first['device_name']}; weights built in "
          f"{first['build_seconds']:.1f} s, host peak RSS while building {first['build_peak_rss_bytes'] / gib:.2f} GiB")  # fmt: skip
    print(f"{'method':<20} {'wall s':>7} {'speedup':>7} {'fwd':>4} {'tok/s':>7} {'cost tok':>8} {'vision s':>8} "
          f"{'dec s/fwd':>9} {'head s/fwd':>10} {'rest s/fwd':>10} {'RSS GiB':>7} {'+gen GiB':>8} {'GPU GiB':>7} "
          f"{'= exact':>7}")  # fmt: skip
    for name, r in results.items():
        row = summary["methods"][name] = _row(r, ref, exact_tokens, args.gen_length)
        per = row["per_pass_seconds"]
        gpu = f"{row['cuda_peak_allocated_bytes'] / gib:.2f}" if "cuda_peak_allocated_bytes" in row else "-"
        speedup = f"{row['speedup_vs_reference']:.1f}x" if ref else "-"
        print(f"{name:<20} {r['seconds']:>7.2f} {speedup:>7} {r['forward_passes']:>4} "
              f"{row['answer_tokens_per_second']:>7.2f} {row['cost_full_forwards_tokens']:>8.2f} "
              f"{row['split_seconds']['vision']:>8.2f} {per['decoder']:>9.3f} {per['lm_head']:>10.4f} "
              f"{per['sampling_and_rest']:>10.4f} {r['peak_rss_bytes'] / gib:>7.2f} "
              f"{r['generation_peak_increase_bytes'] / gib:>8.2f} {gpu:>7} {row['agreement_with_exact'] or '-':>7}")  # fmt: skip
    print("cost tok: decoder tokens per row / (prompt + answer); vision: tower + projector, once per call; dec/head/rest "
          "s/fwd: decoder, LM head and the rest (sampling, bookkeeping) per forward pass; RSS: the worker's peak; +gen: "
          "RSS increase during the call; GPU: peak allocated by torch; = exact: answer tokens equal to exact mode's")  # fmt: skip
    return summary


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "released"), default="tiny",
                        help="tiny: hidden 256, 4 layers, small SigLIP, real vocabulary (default); released: "
                             "LladaVConfig(), the 8B architecture, shrunk only by the size flags given")  # fmt: skip
    parser.add_argument("--hidden", type=int, help="decoder width (tiny: 256; released: 4096)")
    parser.add_argument("--layers", type=int, help="decoder layers (tiny: 4; released: 32)")
    parser.add_argument("--heads", type=int, help="attention heads (tiny: 4; released: 32)")
    parser.add_argument("--vision-layers", type=int, help="SigLIP layers (tiny: 2; released: 26)")
    parser.add_argument("--vision-hidden", type=int, help="released only: SigLIP width (1152)")
    parser.add_argument("--vision-heads", type=int, help="released only: SigLIP heads (16)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument(
        "--stop-token-id",
        type=int,
        default=None,
        help="a one-token stop sequence for every method (default: none, the whole answer is decoded)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} ('none' for no method)",
    )
    parser.add_argument("--batch-sizes", default="1",
                        help="comma-separated rows per call for each method (the request repeated; the reference "
                             "loop is batch 1 only)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where everything runs")
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="weights and compute (auto: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--attn-implementation", default="sdpa", help="eager, sdpa, flash_attention_2, ...")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="NF4 decoder linears (bitsandbytes, CUDA)")
    quant.add_argument("--load-in-8bit", action="store_true", help="LLM.int8 decoder linears (bitsandbytes, CUDA)")
    parser.add_argument("--image", help="the request's image (default: the official test.jpg); 'none': text only")
    parser.add_argument("--warmup", action="store_true", help="one untimed one-step call before the timed one")
    parser.add_argument(
        "--skip-full-forward",
        action="store_true",
        help="do not time one full forward per method (the 'cost time' unit)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch-throughput",
        action="store_true",
        help="also time one batch of --batch-size demo questions vs one call per question",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-gen-length", type=int, default=4)
    parser.add_argument("--batch-steps", type=int, default=4)
    parser.add_argument("--batch-repeats", type=int, default=3, help="best of this many timings of each")
    parser.add_argument(
        "--demo-accuracy",
        type=int,
        default=0,
        metavar="N",
        help="also compare exact vs fast accuracy on N held-out demo questions (needs the trained demo checkpoint)",
    )
    parser.add_argument("--demo-seed", type=int, default=0)
    parser.add_argument("--demo-model", help="demo checkpoint folder (default: llada_v/demo/checkpoint)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch-rows", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Resolves `--dtype auto` and rejects what cannot run, naming the values; returns (methods, batch sizes)."""
    methods = [] if args.methods == "none" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {batch_sizes}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    bits = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit" if args.load_in_8bit else None
    if bits and not args.device.startswith("cuda"):
        parser.error(f"{bits} needs --device cuda (got --device {args.device}): the benchmark quantises with "
                     "bitsandbytes on the GPU and measures GPU memory")  # fmt: skip
    if bits and args.dtype == "float32":
        parser.error(f"{bits} computes in --dtype bfloat16 or float16, got {args.dtype}")
    block = min(args.block_length, args.gen_length)
    if args.gen_length % block or args.steps % (args.gen_length // block):
        parser.error(f"--gen-length ({args.gen_length}) must be a multiple of --block-length ({args.block_length}) "
                     f"and --steps ({args.steps}) a multiple of the number of blocks")  # fmt: skip
    return methods, batch_sizes


def run_methods(args: argparse.Namespace, argv: list[str], methods: list[str], batch_sizes: list[int]) -> dict:
    """Each (method, batch size) in its own worker process; returns the workers' results by row name."""
    results: dict[str, dict] = {}
    for batch in batch_sizes:
        for method in methods:
            name = method if batch == 1 else f"{method} x{batch}"
            if method == "reference" and batch > 1:
                print(f"  {name}: skipped (the reference loop is batch 1 only)", file=sys.stderr, flush=True)
                continue
            results[name] = _subprocess([f"--worker={method}", f"--batch-rows={batch}", *argv])
            print(f"  {name}: {results[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    methods, batch_sizes = _check_args(parser, args)
    if args.worker:
        work = {"batch": batch_worker, "demo": demo_accuracy}.get(args.worker)
        print(json.dumps(work(args) if work else worker(args.worker, args)))
        return {}
    results = run_methods(args, argv, methods, batch_sizes)
    summary = summarise(args, results)
    if args.batch_throughput:
        batch = _subprocess(["--worker=batch", *argv])
        summary["batch_throughput"] = batch
        print(f"batch throughput on {batch['device']} ({batch['batch_size']} demo questions, exact mode, demo-shaped random model "
              f"hidden {batch['model']['hidden']}, {batch['model']['layers']} layers, vocab {batch['model']['vocab']}, "
              f"padded prompt {batch['padded_prompt_length']}): {batch['batch_size']} single calls "
              f"{batch['single_calls_seconds']:.2f} s, one batch {batch['batch_seconds']:.2f} s -> "
              f"{batch['throughput_ratio']:.1f}x; identical answers: {batch['identical_answers']}")  # fmt: skip
    if args.demo_accuracy:
        demo = _subprocess(["--worker=demo", *argv])
        summary["demo_accuracy"] = demo
        if "skipped" in demo:
            print(f"demo accuracy: skipped ({demo['skipped']})")
        else:
            print(f"demo accuracy on {demo['n']} held-out questions: exact {100 * demo['exact']['accuracy']:.1f}% "
                  f"({demo['exact']['seconds']:.1f} s), fast {100 * demo['fast']['accuracy']:.1f}% "
                  f"({demo['fast']['seconds']:.1f} s); difference {demo['difference_points']:+.1f} points")  # fmt: skip
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(args.json)  # nothing half-written
    return summary


if __name__ == "__main__":
    main()
