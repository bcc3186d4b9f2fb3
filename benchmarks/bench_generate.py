"""Benchmark `diffusion_generate` against a reference loop that mirrors the official LLaDA-V sampler.

The reference (`reference_generate`) is written from the official `generate_with_embeds` (SPEC section 7):
full-sequence logits at every step, mask detection by embedding comparison, suppression over the whole
`(1, L, V)` logits and a float64 softmax over all of them. Ours computes logits only where a token can be
committed. Both run on the same random-initialised model with the real vocabulary (126464) and a real-shaped
prompt: one 853x1280 image (3633 image tokens) plus 24 text tokens, as in the official demo.

Each method runs in its own subprocess so peak memory is measured separately (peak RSS of the process and
the peak RSS increase during generation, sampled every 2 ms). Prints wall time, peak memory, forward passes,
token agreement and the ratios ours / reference from one run.

    python benchmarks/bench_generate.py                # ~3-4 minutes on 2 CPU cores
    python benchmarks/bench_generate.py --json out.json --hidden 512 --layers 4
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLADA_V_SHARED", REPO.parent / "shared"))
IMAGE_PLACEHOLDER = -200
# The official demo prompt around one image (golden case `test_jpg_s16_g32_b32`): system + user turn, then
# the assistant header; -200 is the image placeholder.
DEMO_PROMPT = [
    126080, 126346, 9125, 126347, 271, 40, 41, 42, 126348, 126346, 882, 126347, 271,
    IMAGE_PLACEHOLDER, 198, 5501, 7664, 279, 2217, 13, 126348, 126346, 598, 126347, 271,
]  # fmt: skip
OFFICIAL_SUPPRESSED = (126081, 126080, 126346, 126347)


# ----------------------------------------------------------------------------------------------------------
# Reference: the official loop, batch size 1


def _official_transfer_counts(block_mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    mask_num = block_mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        counts[i, : remainder[i]] += 1
    return counts


@torch.no_grad()
def reference_generate(
    model,
    inputs_embeds: torch.Tensor,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = 126336,
    stop_token_ids: list[list[int]] | None = None,
    suffix_token_ids: list[int] | None = None,
    suppressed_ids: tuple[int, ...] = OFFICIAL_SUPPRESSED,
    vocab_limit: int | None = None,
) -> tuple[list[int], int]:
    """The official `generate_with_embeds` on merged prompt embeddings `(1, P, D)`.

    `vocab_limit` emulates the official loader's lm_head shrunk to the tokenizer length (logits sliced to it).
    Returns (the official return value as a list of ids, number of forward passes).
    """
    embed = model.get_input_embeddings()
    device = inputs_embeds.device
    prompt_len = inputs_embeds.shape[1]
    suffix = list(suffix_token_ids or [])
    suffix_len = len(suffix)
    total = prompt_len + gen_length + suffix_len
    masked_embed = embed(torch.tensor([mask_id], device=device))  # (1, D)
    x_embeds = masked_embed.repeat(1, total, 1)
    x_embeds[:, :prompt_len] = inputs_embeds.clone()
    x = torch.full((1, total), mask_id, dtype=torch.long, device=device)
    if suffix_len:
        suffix_t = torch.tensor([suffix], dtype=torch.long, device=device)
        x_embeds[:, -suffix_len:] = embed(suffix_t)
        x[:, -suffix_len:] = suffix_t
    prompt_index = torch.zeros((1, total), dtype=torch.bool, device=device)
    prompt_index[:, :prompt_len] = True

    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    stop_position, found_stop = prompt_len + gen_length, False
    forward_passes = 0
    for num_block in range(num_blocks):
        block_start = prompt_len + num_block * block_length
        block_end = block_start + block_length
        if found_stop and stop_position <= block_start:
            break
        block_mask_index = torch.all(torch.abs(x_embeds[:, block_start:block_end] - masked_embed) < 1e-5, dim=2)
        num_transfer_tokens = _official_transfer_counts(block_mask_index, steps)
        for i in range(steps):
            mask_index = torch.all(torch.abs(x_embeds - masked_embed) < 1e-5, dim=2)  # (1, L)
            if found_stop and not mask_index[0, prompt_len:stop_position].any():
                break
            if not mask_index[0, block_start:block_end].any():
                break
            if cfg_scale > 0.0:
                un_embeds = x_embeds.clone()
                un_mask = prompt_index.unsqueeze(-1).expand_as(x_embeds)
                un_embeds[un_mask] = masked_embed.repeat(1, total, 1)[un_mask]
                logits = model(inputs_embeds=torch.cat([x_embeds, un_embeds], dim=0)).logits.float()
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(inputs_embeds=x_embeds).logits.float()  # (1, L, V): every position
            forward_passes += 1
            if vocab_limit is not None:
                logits = logits[..., :vocab_limit]
            for token_id in suppressed_ids:
                logits[:, :, token_id] = torch.where(mask_index, -float("inf"), logits[:, :, token_id])

            if temperature == 0:
                x0 = torch.argmax(logits, dim=-1)
            else:
                noisy = logits.to(torch.float64)
                gumbel = (-torch.log(torch.rand_like(noisy, dtype=torch.float64))) ** temperature
                x0 = torch.argmax(noisy.exp() / gumbel, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)  # (1, L, V) float64: the official cost
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
                del p
            else:
                x0_p = torch.rand(x0.shape, device=device)
            if found_stop:
                x0_p[:, stop_position:] = -np.inf
            else:
                x0_p[:, block_end:] = -np.inf
            if suffix_len:
                x0_p[:, -suffix_len:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            _, select_index = torch.topk(confidence[0], k=int(num_transfer_tokens[0, i]))
            transfer_index[0, select_index] = True
            x0_embeds = torch.where(mask_index.unsqueeze(-1), embed(x0), x_embeds)
            x_embeds[transfer_index] = x0_embeds[transfer_index]
            x[transfer_index] = x0[transfer_index]

            if stop_token_ids:
                generated = x[0, prompt_len : prompt_len + gen_length]
                for stop_seq in stop_token_ids:
                    for start in range(generated.size(0) - len(stop_seq) + 1):
                        if torch.all(generated[start : start + len(stop_seq)] == torch.tensor(stop_seq, device=device)):
                            position = prompt_len + start
                            if not found_stop or position < stop_position:
                                stop_position, found_stop = position, True
                            break
                    if found_stop:
                        break
    end = stop_position if found_stop else prompt_len + gen_length
    answer = x[0, prompt_len:end].tolist()
    return answer + (x[0, -suffix_len:].tolist() if suffix_len else []), forward_passes


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


def worker(method: str, model_dir: str, args: argparse.Namespace) -> dict:
    """Runs one method in this process and returns its measurements."""
    from llada_v import LladaVModel

    torch.set_num_threads(args.threads)
    model = LladaVModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = prompt_inputs(model)
    settings = dict(steps=args.steps, gen_length=args.gen_length, block_length=args.block_length)
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
                model, embeds, **settings, stop_token_ids=None, vocab_limit=model.config.tokenizer_vocab_size
            )
        else:
            out = model.diffusion_generate(
                **inputs,
                steps=args.steps,
                max_new_tokens=args.gen_length,
                block_length=args.block_length,
                stop_token_ids=None,
                return_dict_in_generate=True,
            )
            prompt_len = inputs["input_ids"].shape[1]
            tokens = out.sequences[0, prompt_len : prompt_len + int(out.answer_lengths[0])].tolist()
            passes = out.num_forward_passes
        seconds = time.perf_counter() - start
    return {
        "method": method,
        "seconds": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "generation_peak_increase_bytes": sampler.peak - baseline,
        "forward_passes": passes,
        "tokens": tokens,
        "prompt_length": int(inputs["input_ids"].shape[1]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--block-length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=("reference", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args)))
        return {}

    forwarded = [
        f"--hidden={args.hidden}", f"--layers={args.layers}", f"--heads={args.heads}", f"--steps={args.steps}",
        f"--gen-length={args.gen_length}", f"--block-length={args.block_length}", f"--threads={args.threads}",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.hidden, args.layers, args.heads, args.seed)
        results = {}
        for method in ("reference", "ours"):
            proc = subprocess.run(
                [sys.executable, __file__, f"--worker={method}", f"--model-dir={tmp}", *forwarded],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                sys.exit(f"{method} worker failed:\n{proc.stderr}")
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])

    ref, ours = results["reference"], results["ours"]
    agree = sum(a == b for a, b in zip(ref["tokens"], ours["tokens"]))
    summary = {
        "settings": {
            "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": 126464,
            "prompt_length": ours["prompt_length"], "steps": args.steps, "gen_length": args.gen_length,
            "block_length": args.block_length, "threads": args.threads, "torch": torch.__version__,
        },
        "reference": {k: v for k, v in ref.items() if k != "tokens"},
        "ours": {k: v for k, v in ours.items() if k != "tokens"},
        "identical_tokens": ref["tokens"] == ours["tokens"],
        "token_agreement": f"{agree}/{max(len(ref['tokens']), len(ours['tokens']))}",
        "speedup": ref["seconds"] / ours["seconds"],
        "time_ratio": ours["seconds"] / ref["seconds"],
        "peak_rss_ratio": ours["peak_rss_bytes"] / ref["peak_rss_bytes"],
        "generation_peak_increase_ratio": ours["generation_peak_increase_bytes"]
        / max(1, ref["generation_peak_increase_bytes"]),
    }  # fmt: skip
    gib = 1024**3
    print(f"prompt {ours['prompt_length']} tokens, answer {args.gen_length}, steps {args.steps}, "
          f"block {args.block_length}; hidden {args.hidden}, {args.layers} layers, vocab 126464, "
          f"{args.threads} threads")  # fmt: skip
    print(f"{'method':<10} {'wall s':>8} {'peak RSS GiB':>13} {'gen. peak +GiB':>15} {'forwards':>9}")
    for r in (ref, ours):
        print(f"{r['method']:<10} {r['seconds']:>8.1f} {r['peak_rss_bytes'] / gib:>13.2f} "
              f"{r['generation_peak_increase_bytes'] / gib:>15.2f} {r['forward_passes']:>9}")  # fmt: skip
    print(f"identical tokens: {summary['identical_tokens']} ({summary['token_agreement']})")
    print(f"time ours/reference: {summary['time_ratio']:.3f} (speedup {summary['speedup']:.2f}x)")
    print(f"peak RSS ours/reference: {summary['peak_rss_ratio']:.3f}; "
          f"generation peak increase ours/reference: {summary['generation_peak_increase_ratio']:.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
