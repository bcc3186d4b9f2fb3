"""The accelerations' quality over many blocks, on the trained demo model.

The demo's questions are answered in one 4-token block, so there the key/value caches never see a second
block. Its scene descriptions are longer: "Which shapes are there?" -> "red circle blue square green triangle"
(objects from the left) and "Which colors are there?" (objects by colour name). A three-object description is
6 words (one token each: the demo tokenizer is word-level) plus `<|eot_id|>`: 7 tokens. Decoded with
`max_new_tokens=8, steps=8, block_length=2` it spans 4 blocks of 2 tokens, 2 passes per block, so every
acceleration acts: a cached pass in every block, a refresh at every block start, the threshold can commit a
whole block in one pass.

On a model of the scenes task (`python -m llada_v.demo.train --task scenes`, found from its tokenizer) the
descriptions name each object's size, colour and shape from the left, joined by "left of" (5n - 2 words for n
of 1-5 objects, up to 24 tokens with `<|eot_id|>`), and the defaults become `max_new_tokens=32, steps=32,
block_length=8` (4 blocks of 8, as `llada-v eval-demo` scores them) on scenes of any size (`--objects 0`).

Held-out scenes only: string seeds `held-out-blocks-{seed}-{i}` (training draws integer seeds >= 1e6,
`llada_v.demo.train.TRAIN_SEED_OFFSET`), kept when they hold `--objects` shapes (0: any), questions
alternating between the two orders (the scenes task: from the left only). Reported per method (exact mode, each acceleration alone, the fast preset, and the
fast preset with `--extra` options, dLLM-Cache at the official 25/7/0.25): exact match of the whole description against the truth, token agreement
with exact mode (answer positions, `<|eot_id|>` included, that hold the same id, over the longer of the two
answers), answers identical to exact mode's, forward passes and wall time. `--reference` also runs the
official loop (tests/official_sampler.py) per scene and counts the scenes where exact mode's ids differ.

`--cost` instead times exact, dual and the fast preset with and without `lm_head_shortlist` on a random model
of `--hidden` width with the real vocabulary and a `--prompt-length` text prompt (docs/performance.md).

    python benchmarks/bench_blocks.py --n 500 --threads 1
    python benchmarks/bench_blocks.py --n 8 --reference --json out.json
    python benchmarks/bench_blocks.py --n 150 --extra fast_shortlist:lm_head_shortlist=4
    python benchmarks/bench_blocks.py --cost --threads 1 --gen-length 16 --steps 16 --block-length 4
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the parity oracle: tests/official_sampler.py
from official_sampler import reference_generate  # noqa: E402

SETTINGS = {"max_new_tokens": 8, "steps": 8, "block_length": 2}
SCENES_SETTINGS = {"max_new_tokens": 32, "steps": 32, "block_length": 8}  # the scenes task's (eval-demo's)
FAST = "fast"  # LladaVGenerationConfig.fast(model.generation_config)
METHODS: dict[str, dict] = {
    "exact": {},
    "prefix": {"kv_cache": "prefix"},
    "dual": {"kv_cache": "dual"},
    "prompt_once": {"kv_cache": "dual", "kv_cache_prompt_refresh": "once"},
    "threshold": {"confidence_threshold": 0.9},
    FAST: {},
    "dllm_cache": {"dllm_cache": {}},  # dLLM-Cache at the official demo's 25/7/0.25
}
SEED_PREFIX = "held-out-blocks"


def held_out_scenes(n: int, seed: int = 0, objects: int = 3, task: str = "shapes") -> list[dict]:
    """`n` held-out scenes of `task` with `objects` shapes each (0: any), the description question (orders
    alternating; the scenes task: from the left) and its answer."""
    from llada_v.demo.tasks import get_task

    module = get_task(task)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= objects <= module.MAX_OBJECTS or (objects == 0 and task == "shapes"):
        raise ValueError(f"objects must be 1, 2 or 3 (the demo's scenes), got {objects}" if task == "shapes" else
                         f"objects must be 0 (any) to {module.MAX_OBJECTS} (the scenes task), got {objects}")  # fmt: skip
    orders = module.DESCRIPTION_ORDERS if task == "shapes" else ("left",)
    scenes, index = [], 0
    while len(scenes) < n:
        scene = module.draw_scene(random.Random(f"{SEED_PREFIX}-{seed}-{index}"))
        index += 1
        if objects and len(scene.objects) != objects:
            continue
        question, truth = module.describe(scene, orders[len(scenes) % len(orders)])
        scenes.append({"image": scene.image, "question": question, "truth": truth})
    return scenes


def method_config(model, method: str, settings: dict, extra: dict | None = None):
    """The generation config of `method` on the model's own settings (special ids) with `settings`."""
    from llada_v import LladaVGenerationConfig

    options = {**METHODS.get(method, {}), **settings, **(extra or {})}
    if method.startswith(FAST):
        return LladaVGenerationConfig.fast(model.generation_config, **options)
    config = copy.deepcopy(model.generation_config)
    unused = config.update(**options)
    if unused:
        raise ValueError(f"unknown generation settings {sorted(unused)} for method {method!r}")
    config.validate()
    return config


@torch.no_grad()
def run_method(model, processor, scenes: list[dict], config, batch_size: int) -> dict:
    """Answer every scene's question with `config`; answer ids with the stop, decoded texts, passes, seconds."""
    from llada_v.inference import chat_prompt, generate_texts, user_message

    eot = model.config.eot_token_id
    ids, texts, passes = [], [], 0
    start = time.perf_counter()
    for first in range(0, len(scenes), batch_size):
        batch = scenes[first : first + batch_size]
        prompts = [chat_prompt(processor, [user_message(s["question"], 1)], system_prompt="") for s in batch]
        out_texts, out = generate_texts(model, processor, prompts, [[s["image"]] for s in batch], config)
        for row, answer in enumerate(out.answer_ids()):
            stopped = int(out.answer_lengths[row]) < config.max_new_tokens
            ids.append(answer + [eot] if stopped else answer)
        texts.extend(out_texts)
        passes += int(out.forward_passes_per_row.sum())
    return {"ids": ids, "texts": texts, "passes": passes, "seconds": time.perf_counter() - start}


@torch.no_grad()
def reference_ids(model, processor, scene: dict, settings: dict) -> list[int]:
    """The official loop's answer for one scene (tests/official_sampler.py), `<|eot_id|>` included if found."""
    from llada_v.inference import chat_prompt, prepare_inputs, user_message

    prompt = chat_prompt(processor, [user_message(scene["question"], 1)], system_prompt="")
    inputs = prepare_inputs(processor, [prompt], [[scene["image"]]], model.device)
    embeds = model.embed_multimodal(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
    config = model.generation_config
    tokens, _ = reference_generate(
        model, embeds, steps=settings["steps"], gen_length=settings["max_new_tokens"],
        block_length=settings["block_length"], mask_id=config.mask_token_id,
        stop_token_ids=[[model.config.eot_token_id]], suppressed_ids=tuple(config.suppress_tokens),
        vocab_limit=config.tokenizer_vocab_size,
    )  # fmt: skip
    tokens = [int(t) for t in tokens]  # the official return value ends before the stop
    return tokens + [model.config.eot_token_id] if len(tokens) < settings["max_new_tokens"] else tokens


def token_agreement(ids: list[list[int]], exact: list[list[int]]) -> float:
    """Answer positions holding the same id in both, over the longer answer of each pair, summed over scenes."""
    same = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(ids, exact))
    total = sum(max(len(x), len(y)) for x, y in zip(ids, exact))
    return same / total


def benchmark(model, processor, n: int, seed: int = 0, objects: int = 3, methods=tuple(METHODS),
              settings: dict | None = None, extra: dict | None = None, batch_size: int = 50,
              reference: bool = False) -> dict:  # fmt: skip
    """Every method on the same `n` held-out scenes. `extra`: name -> options for further methods (a name
    starting with "fast" builds on the preset). Exact mode always runs: it is what the others are compared to."""
    from llada_v.demo.model import task_of
    from llada_v.demo.task import normalise_answer

    task = task_of(processor.tokenizer)
    settings = {**(SETTINGS if task == "shapes" else SCENES_SETTINGS), **(settings or {})}
    scenes = held_out_scenes(n, seed, objects, task)
    truths = [s["truth"] for s in scenes]
    runs = {}
    order = ["exact", *[m for m in methods if m != "exact"], *(extra or {})]
    for method in order:
        config = method_config(model, method, settings, (extra or {}).get(method))
        runs[method] = run_method(model, processor, scenes, config, batch_size)
    exact = runs["exact"]["ids"]
    rows = {}
    for method, run in runs.items():
        rows[method] = {
            "exact_match": sum(normalise_answer(t) == truth for t, truth in zip(run["texts"], truths)) / n,
            "token_agreement": token_agreement(run["ids"], exact),
            "identical_to_exact": sum(a == b for a, b in zip(run["ids"], exact)) / n,
            "forward_passes": run["passes"],
            "seconds": run["seconds"],
        }
    result = {"n": n, "seed": seed, "objects": objects, "task": task, "settings": settings, "methods": rows,
              "answer_tokens": [len(ids) for ids in exact], "ids": {m: r["ids"] for m, r in runs.items()}}  # fmt: skip
    if reference:
        ref = [reference_ids(model, processor, scene, settings) for scene in scenes]
        result["reference_ids"] = ref
        result["exact_differs_from_reference"] = sum(a != b for a, b in zip(exact, ref))
    return result


@torch.no_grad()
def cost_ratios(hidden: int = 1024, layers: int = 2, heads: int = 8, prompt: int = 700, shortlist: int = 4,
                settings: dict | None = None, repeats: int = 2, seed: int = 0) -> dict:  # fmt: skip
    """Wall time of exact, dual and the fast preset, each with and without `lm_head_shortlist`, on a random
    text-only model of width `hidden` with the real vocabulary (126464) and a `prompt`-token prompt; each mode
    `repeats` times in alternating order, the fastest run kept. Random weights: the threshold never fires."""
    from llada_v import LladaVConfig, LladaVGenerationConfig, LladaVModel

    config = LladaVConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LladaVModel(config).eval()
    ids = torch.randint(0, 100_000, (1, prompt))  # ordinary text ids, below every special id
    settings = {"max_new_tokens": 16, "steps": 16, "block_length": 4, "stop_token_ids": None, **(settings or {})}
    base = LladaVGenerationConfig.from_model_config(config)
    modes = {}
    for name, options in (("exact", {}), ("dual", {"kv_cache": "dual"}), (FAST, None)):
        for size in (None, shortlist):
            extra = {**settings, "lm_head_shortlist": size}
            label = name if size is None else f"{name} + shortlist {size}"
            modes[label] = LladaVGenerationConfig.fast(base, **extra) if options is None else copy.deepcopy(base)
            if options is not None:
                modes[label].update(**options, **extra)
                modes[label].validate()
    seconds = {label: float("inf") for label in modes}
    answers = {}
    for _ in range(repeats):
        for label, generation_config in modes.items():
            start = time.perf_counter()
            out = model.diffusion_generate(ids, generation_config=generation_config)
            seconds[label] = min(seconds[label], time.perf_counter() - start)
            answers[label] = out[0, prompt:].tolist()
    return {"seconds": seconds, "answers": answers, "hidden": hidden, "layers": layers, "prompt": prompt,
            "settings": settings, "threads": torch.get_num_threads()}  # fmt: skip


def cost_table(cost: dict) -> str:
    lines = [
        "| mode | seconds | with the shortlist / without | answer equal to the mode without |",
        "|---|---|---|---|",
    ]
    plain = None
    for label, seconds in cost["seconds"].items():
        if "shortlist" not in label:
            plain = label
            lines.append(f"| {label} | {seconds:.2f} | | |")
        else:
            same = cost["answers"][label] == cost["answers"][plain]
            lines.append(
                f"| {label} | {seconds:.2f} | {seconds / cost['seconds'][plain]:.2f} | {'yes' if same else 'no'} |"
            )
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    exact = result["methods"]["exact"]
    lines = [
        "| method | exact match | vs exact (points) | token agreement with exact | identical to exact | forward passes | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in result["methods"].items():
        delta = 100 * (row["exact_match"] - exact["exact_match"])
        lines.append(
            f"| {method} | {100 * row['exact_match']:.1f}% | {delta:+.1f} | {100 * row['token_agreement']:.2f}% | "
            f"{100 * row['identical_to_exact']:.1f}% | {row['forward_passes']} | {row['seconds']:.1f} s |"
        )
    return "\n".join(lines)


def _options(text: str) -> tuple[str, dict]:
    """`name:key=value,key=value` -> (name, options); values parsed as JSON where they parse."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--extra expects name:key=value,...; got {text!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="held-out scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--objects", type=int, default=None,
                        help="shapes per scene (default 3: 6-word descriptions; a scenes model: 0, any)")  # fmt: skip
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--extra", action="append", default=[], help="more methods: name:key=value,... (repeatable)")
    parser.add_argument("--gen-length", type=int, default=None, help="default 8 (a scenes model: 32)")
    parser.add_argument("--steps", type=int, default=None, help="default 8 (a scenes model: 32)")
    parser.add_argument("--block-length", type=int, default=None, help="default 2 (a scenes model: 8)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference", action="store_true", help="also run the official loop per scene")
    parser.add_argument("--model", type=Path, default=None, help="demo checkpoint (default: the shipped one)")
    parser.add_argument("--json", type=Path, default=None, help="write the results (ids included) here")
    parser.add_argument("--cost", action="store_true",
                        help="instead: time exact/dual/fast with and without lm_head_shortlist on a wide random model")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=1024, help="--cost: model width")
    parser.add_argument("--prompt-length", type=int, default=700, help="--cost: prompt tokens")
    parser.add_argument("--shortlist", type=int, default=4, help="--cost: lm_head_shortlist")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = {"max_new_tokens": args.gen_length, "steps": args.steps, "block_length": args.block_length}
    settings = {key: value for key, value in settings.items() if value is not None}
    if args.cost:
        settings = {**SETTINGS, **settings}
        cost = cost_ratios(args.hidden, prompt=args.prompt_length, shortlist=args.shortlist, settings=settings)
        print(f"hidden {cost['hidden']}, {cost['layers']} layers, vocabulary 126464, prompt {cost['prompt']} tokens, "
              f"{cost['settings']}, {cost['threads']} threads, fastest of 2")  # fmt: skip
        print(cost_table(cost))
        return 0
    from llada_v.demo.app import load_demo
    from llada_v.demo.model import task_of

    model, processor = load_demo(args.model)
    objects = args.objects if args.objects is not None else (3 if task_of(processor.tokenizer) == "shapes" else 0)
    extra = dict(_options(text) for text in args.extra)
    result = benchmark(model, processor, args.n, args.seed, objects, methods, settings, extra,
                       args.batch_size, args.reference)  # fmt: skip
    print(f"{args.n} held-out scenes ({result['task']} task) with {objects or '1-5'} shapes (seed {args.seed}), "
          f"{result['settings']}, {torch.get_num_threads()} threads")  # fmt: skip
    lengths = result["answer_tokens"]
    print(f"exact-mode answer length (tokens, <|eot_id|> included): min {min(lengths)}, max {max(lengths)}, "
          f"mean {sum(lengths) / len(lengths):.2f}")  # fmt: skip
    print(markdown_table(result))
    if args.reference:
        print(f"exact mode differs from the official loop on {result['exact_differs_from_reference']} scenes")
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
