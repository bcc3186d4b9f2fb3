"""Memory per GPU for fine-tuning the released 8B LLaDA-V shape: computed, not measured (docs/training.md).

    python scripts/memory_plan.py [--gpus 4 8] [--lora-rank 16 128] [--tokens 8192]

Parameter counts come from `LladaVConfig()` built on the meta device (no weights). What the table adds up:
- full fine-tuning, bf16 mixed precision (`--bf16`, float32 master weights): 16 bytes per parameter, sharded over
  the GPUs by FSDP2 (`configs/fsdp2.json`) and by ZeRO-3 (`configs/deepspeed_zero3.json`) alike: FSDP2 keeps the
  float32 weight (4), its float32 gradient (4) and Adam's two float32 moments (8); ZeRO-3 keeps a bf16 weight (2)
  and gradient (2) plus float32 master weight and moments (12). On top, gathered bf16 weights while they are in
  use: FSDP2 two shard units in flight (the largest unit twice) plus `lm_head`, which accelerate keeps gathered
  after the forward; ZeRO-3 at most `stage3_max_live_parameters` (1e9) parameters;
- LoRA on one GPU: bf16 base weights (`--dtype bfloat16`, frozen: 2 bytes each), float32 adapters with gradient
  and Adam moments (16 bytes each; PEFT keeps adapters in float32);
- activations (with activation checkpointing), per sample of T tokens: the saved input of every decoder layer in
  bf16 (layers x T x hidden x 2) and the float32 logits at the masked positions (about T / 2 of the answer tokens
  on average; T / 2 x vocab x 4, taken once for the logits and once for their gradient). Not included: the
  recomputed layer's working set, framework buffers, fragmentation.
"""

from __future__ import annotations

import argparse
import re

import torch

from llada_v import LladaVConfig, LladaVModel
from llada_v.training.sharding import fsdp_wrap_classes
from llada_v.training.trainer import LORA_TARGET_MODULES, module_group

GB = 1e9
FULL_BYTES_PER_PARAMETER = 16  # fp32 weight + fp32 grad + 2 fp32 Adam moments (or bf16 w + g + fp32 master + moments)
ZERO3_MAX_LIVE_PARAMETERS = 1e9  # configs/deepspeed_zero3.json


def model_facts() -> dict:
    with torch.device("meta"):
        model = LladaVModel(LladaVConfig())
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        groups[module_group(name)] = groups.get(module_group(name), 0) + param.numel()
    units = set(fsdp_wrap_classes(model))
    largest_unit = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in units)
    lora_per_rank = sum(
        m.in_features + m.out_features for n, m in model.named_modules() if re.fullmatch(LORA_TARGET_MODULES, n)
    )
    text = model.config.text_config
    return {
        "total": sum(groups.values()),
        "groups": groups,
        "largest_unit": largest_unit,
        "lm_head": model.lm_head.weight.numel(),
        "lora_per_rank": lora_per_rank,
        "layers": text.num_hidden_layers,
        "hidden": text.hidden_size,
        "vocab": text.vocab_size,
    }


def activations_gb(facts: dict, tokens: int) -> float:
    saved_inputs = facts["layers"] * tokens * facts["hidden"] * 2
    masked_logits = 2 * (tokens // 2) * facts["vocab"] * 4
    return (saved_inputs + masked_logits) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lora-rank", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    f = model_facts()
    n = f["total"]
    print(f"parameters: {n:,} ({', '.join(f'{g} {c:,}' for g, c in f['groups'].items())})")
    print(
        f"largest FSDP unit: {f['largest_unit']:,}; lm_head: {f['lm_head']:,}; LoRA parameters per rank: "
        f"{f['lora_per_rank']:,}"
    )
    fsdp_gathered = (2 * f["largest_unit"] + f["lm_head"]) * 2 / GB
    zero3_gathered = ZERO3_MAX_LIVE_PARAMETERS * 2 / GB
    acts = activations_gb(f, args.tokens)
    print(f"activations per sample of {args.tokens} tokens (estimate): {acts:.1f} GB")
    print("| setup | GPUs | sharded states | gathered weights | total before activations |")
    print("|---|---:|---:|---:|---:|")
    for gpus in args.gpus:
        states = FULL_BYTES_PER_PARAMETER * n / gpus / GB
        print(
            f"| full, FSDP2, bf16 mixed | {gpus} | 16 x {n:,} / {gpus} = {states:.1f} GB | {fsdp_gathered:.1f} GB "
            f"| {states + fsdp_gathered:.1f} GB |"
        )
        print(
            f"| full, ZeRO-3, bf16 | {gpus} | 16 x {n:,} / {gpus} = {states:.1f} GB | <= {zero3_gathered:.1f} GB "
            f"| <= {states + zero3_gathered:.1f} GB |"
        )
    for rank in args.lora_rank:
        adapters = rank * f["lora_per_rank"]
        base = 2 * n / GB
        trained = FULL_BYTES_PER_PARAMETER * adapters / GB
        print(
            f"| LoRA r={rank}, bf16 base | 1 | base 2 x {n:,} = {base:.1f} GB, adapters 16 x {adapters:,} = "
            f"{trained:.2f} GB | - | {base + trained:.1f} GB |"
        )


if __name__ == "__main__":
    main()
