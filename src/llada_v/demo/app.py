"""The demo on the embedded model: ask questions about a rendered scene, watch the answer denoise, and
measure held-out accuracy.

- `llada-v demo [--image PATH] [--seed N] [--save-gif F | --save-png F]`
- `llada-v eval-demo --seed N [--n 200] [--n-descriptions 200]` (ends with the lines `one-word accuracy: 98.5%`
  and `description accuracy: 90.0%`)

The shipped checkpoint (`llada_v/demo/checkpoint/`) is a complete checkpoint folder: it loads with
`AutoModel`/`AutoProcessor.from_pretrained(path, trust_remote_code=True)` like any Hub model.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..arguments import tqdm_disable
from ..inference import (
    InputError,
    chat_prompt,
    generate_texts,
    generation_config_for,
    load_pretrained,
    read_image,
    user_message,
)
from .model import demo_model_dir, task_of
from .task import DESCRIBE_QUESTIONS, QUESTION_TYPES, SHAPES, normalise_answer
from .tasks import DEFAULT_TASK, get_task

HELD_OUT_PREFIX = "held-out"  # held-out scenes use string seeds, training scenes integer seeds >= 1e6
# One-word answers use the checkpoint's generation settings. Descriptions (up to 23 words and `<|eot_id|>` in
# the scenes task): 32 new tokens in 4 blocks of 8, one token per step (exact mode).
DESCRIPTION_GENERATION = dict(max_new_tokens=32, steps=32, block_length=8)


def load_demo(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The demo model and processor (eval mode, on the CPU) from `path` (default: the checkpoint shipped in
    the package)."""
    path = Path(path) if path is not None else demo_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no demo checkpoint at {path}; train one with `python -m llada_v.demo.train --output-dir {path}`"
        )
    return load_pretrained(path, dtype=dtype, device="cpu")


DENOISING_LEGEND = (
    "Each step shows the answer canvas: _ is a position still masked, . is end-of-text padding; <|eot_id|> ends "
    "the answer (the masks after it are never filled: the sampler stops there, and A: is the text before it)."
)


@dataclass
class Answer:
    question: str
    text: str
    frames: list[list[str]]  # the answer canvas after every step (tokens; masks shown as "_")


@torch.no_grad()
def answer_questions(
    model, processor, images: list[Image.Image], questions: list[str], trace: bool = False, **generation_kwargs
) -> list[Answer]:
    """Answer `questions[i]` about `images[i]` in one batch (no system prompt, as the demo was trained);
    optionally record the denoising. `generation_kwargs` override the checkpoint's generation settings, or
    `generation_config=` (a `LladaVGenerationConfig`, e.g. the fast preset) replaces them."""
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions")
    texts = [chat_prompt(processor, [user_message(q, 1)], system_prompt="") for q in questions]
    tokenizer = processor.tokenizer
    base = generation_kwargs.pop("generation_config", None) or model.generation_config
    config = generation_config_for(base, generation_kwargs)
    frames: list[list[list[str]]] = [[] for _ in questions]

    def record(step):
        canvas = step.canvas[:, step.prompt_length :]
        for row in range(canvas.shape[0]):
            frames[row].append(
                [
                    "_" if t == config.mask_token_id else tokenizer.convert_ids_to_tokens(int(t))
                    for t in canvas[row].tolist()
                ]
            )

    texts_out, _ = generate_texts(model, processor, texts, [[image] for image in images], config,
                                  step_callback=record if trace else None)  # fmt: skip
    return [Answer(question, text, frames[row]) for row, (question, text) in enumerate(zip(questions, texts_out))]


def held_out_sample(seed: int, index: int, task: str = DEFAULT_TASK) -> dict:
    return get_task(task).make_sample(f"{HELD_OUT_PREFIX}-{seed}-{index}")


def held_out_description(seed: int, index: int, task: str = DEFAULT_TASK) -> dict:
    """A held-out scene of `task` with its description question from the left and the one right answer (a stream
    of its own: `held-out-description-{seed}-{index}`)."""
    module = get_task(task)
    scene = module.draw_scene(random.Random(f"{HELD_OUT_PREFIX}-description-{seed}-{index}"))
    question, truth = module.describe(scene, "left")
    return {"image": scene.image, "question": question, "truth": truth, "objects": scene.objects}


def evaluate(
    model, processor, seed: int, n: int = 200, batch_size: int = 32, progress: bool | None = False, **generation_kwargs
) -> dict:
    """Exact-match accuracy of one-word answers on `n` fresh held-out samples for `seed`, overall and per question
    type, on the task the model's tokenizer was built for (the checkpoint's generation settings unless
    `generation_kwargs` override them).

    `progress`: a bar over the questions on stderr (None: only when stderr is a terminal; default: none)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    task = task_of(processor.tokenizer)
    correct, total = defaultdict(int), defaultdict(int)
    samples = [held_out_sample(seed, i, task) for i in range(n)]
    bar = tqdm(total=n, desc="eval-demo", unit="question", disable=tqdm_disable(progress))
    for start in range(0, n, batch_size):
        batch = samples[start : start + batch_size]
        answers = answer_questions(
            model, processor, [s["image"] for s in batch], [s["qa"][0][0] for s in batch], **generation_kwargs
        )
        for sample, answer in zip(batch, answers):
            kind = sample["types"][0]
            total[kind] += 1
            correct[kind] += normalise_answer(answer.text) == sample["qa"][0][1]
        bar.update(len(batch))
    bar.close()
    per_type = {kind: correct[kind] / total[kind] for kind in QUESTION_TYPES if total[kind]}
    return {"accuracy": sum(correct.values()) / n, "per_type": per_type, "n": n, "counts": dict(total)}


def evaluate_descriptions(
    model, processor, seed: int, n: int = 200, batch_size: int = 32, progress: bool | None = False, **generation_kwargs
) -> dict:
    """Exact match of whole descriptions ("Which shapes are there?", objects from the left) on `n` held-out
    scenes for `seed` of the model's task, overall and by number of objects (`DESCRIPTION_GENERATION`: 32 tokens,
    4 blocks of 8, exact mode, unless `generation_kwargs` override it)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    settings = {**DESCRIPTION_GENERATION, **generation_kwargs}
    correct, total = defaultdict(int), defaultdict(int)
    task = task_of(processor.tokenizer)
    scenes = [held_out_description(seed, i, task) for i in range(n)]
    bar = tqdm(total=n, desc="eval-demo descriptions", unit="scene", disable=tqdm_disable(progress))
    for start in range(0, n, batch_size):
        batch = scenes[start : start + batch_size]
        answers = answer_questions(
            model, processor, [s["image"] for s in batch], [s["question"] for s in batch], **settings
        )
        for scene, answer in zip(batch, answers):
            count = len(scene["objects"])
            total[count] += 1
            correct[count] += normalise_answer(answer.text) == scene["truth"]
        bar.update(len(batch))
    bar.close()
    per_count = {count: correct[count] / total[count] for count in sorted(total)}
    return {"accuracy": sum(correct.values()) / n, "per_objects": per_count, "n": n, "counts": dict(total)}


# ---------------------------------------------------------------------------------------------- pictures


def denoising_frames(image: Image.Image, answer: Answer, width: int = 360) -> list[Image.Image]:
    """One picture per step: the scene, the question and the answer canvas (masks as grey boxes, wrapped onto as
    many lines as it needs)."""
    scale = min(1.0, 160 / max(image.size), (width - 20) / image.width)
    thumb = image.convert("RGB").resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
    frames = []
    for step, tokens in enumerate(answer.frames):
        boxes, x, line = [], 10, 0
        for token in tokens:
            label = "   " if token == "_" else _short(token)
            box_width = 8 * max(3, len(label)) + 8
            if x + box_width > width - 10 and x > 10:
                x, line = 10, line + 1
            boxes.append((token, label, x, line, box_width))
            x += box_width + 6
        canvas = Image.new("RGB", (width, thumb.height + 70 + 26 * line), "white")
        canvas.paste(thumb, (10, 10))
        draw = ImageDraw.Draw(canvas)
        draw.text((10, thumb.height + 15), f"Q: {answer.question}", fill="black")
        for token, label, x, line, box_width in boxes:
            top = thumb.height + 38 + 26 * line
            draw.rectangle((x, top, x + box_width, top + 20), fill=(200, 200, 200) if token == "_" else (200, 235, 200),
                           outline="black")  # fmt: skip
            draw.text((x + 4, top + 4), label, fill="black")
        draw.text((width - 70, 10), f"step {step + 1}", fill="black")
        frames.append(canvas)
    return frames


# ---------------------------------------------------------------------------------------------- CLI


def run_demo(args: argparse.Namespace) -> int:
    for target in (args.save_gif, args.save_png):  # before the demo runs: fail fast
        if target is not None and not target.expanduser().resolve().parent.is_dir():
            raise InputError(f"cannot write {target}: the folder {target.parent} does not exist")
    image = read_image(args.image) if args.image is not None else None
    model, processor = load_demo(args.model)
    task = get_task(task_of(processor.tokenizer))
    rng = random.Random(args.seed)
    if image is not None:
        questions = [f"What color is the {shape}?" for shape in SHAPES] + ["How many shapes are there?"]
        truths = [None] * len(questions)
        description, description_truth = describe_question(), None
        print(f"image: {args.image} ({image.width}x{image.height})")
    else:
        scene = task.draw_scene(rng)
        while not all(task.can_ask(scene, kind) for kind in QUESTION_TYPES):  # one question of every type
            scene = task.draw_scene(rng)
        image = scene.image
        pairs = [task.ask(scene, kind, rng) for kind in QUESTION_TYPES]
        questions, truths = [q for q, _ in pairs], [a for _, a in pairs]
        description, description_truth = task.describe(scene, "left")
        described = ", ".join(" ".join(["a", *_size(o), o.color, o.shape]) for o in scene.objects)
        print(f"scene {image.width}x{image.height} px (seed {args.seed}): {described}")
    answers = answer_questions(model, processor, [image] * len(questions), questions, trace=True)
    [long_answer] = answer_questions(model, processor, [image], [description], trace=True, **DESCRIPTION_GENERATION)
    print(f"\n{DENOISING_LEGEND}")
    for answer, truth in zip(answers, truths):
        print(f"\nQ: {answer.question}")
        for step, tokens in enumerate(answer.frames, 1):
            print(f"   step {step}: {' '.join(_short(t) for t in tokens)}")
        print(f"A: {answer.text}{_verdict(answer.text, truth)}")
    total, block = DESCRIPTION_GENERATION["max_new_tokens"], DESCRIPTION_GENERATION["block_length"]
    print(
        f"\nQ: {long_answer.question}  ({total}-token canvas in {total // block} blocks of {block}, decoded left to "
        "right, one token per step; * marks the block being decoded)"
    )
    per_block = DESCRIPTION_GENERATION["steps"] // (total // block)
    for step, tokens in enumerate(long_answer.frames):
        current = step // per_block
        blocks = [
            ("*" if k == current else " ") + " ".join(_short(t) for t in tokens[k * block : (k + 1) * block])
            for k in range(total // block)
        ]
        print(f"   block {current + 1} step {step % per_block + 1}: {' |'.join(blocks)}")
    print(f"A: {long_answer.text}{_verdict(long_answer.text, description_truth)}")
    answers = [*answers, long_answer]
    if args.save_gif or args.save_png:
        frames = [f for answer in answers for f in denoising_frames(image, answer)]
        height = max(f.height for f in frames)  # one size for every frame of the animation
        frames = [_pad(f, height) for f in frames]
        if args.save_gif:
            frames[0].save(args.save_gif, save_all=True, append_images=frames[1:], duration=600, loop=0)
            print(f"\nwrote {args.save_gif} ({len(frames)} frames)")
        if args.save_png:
            sheet = Image.new("RGB", (frames[0].width, sum(f.height for f in frames)), "white")
            y = 0
            for frame in frames:
                sheet.paste(frame, (0, y))
                y += frame.height
            sheet.save(args.save_png)
            print(f"\nwrote {args.save_png}")
    return 0


def describe_question() -> str:
    """The description question (objects from the left)."""
    return DESCRIBE_QUESTIONS["left"]


def _short(token: str) -> str:
    """A canvas token as the demo prints it: EOS padding as `.`, masks as `_`."""
    return "." if token == "<|endoftext|>" else token


def _size(obj) -> list[str]:
    return [obj.size] if obj.size is not None else []  # the scenes task's objects have sizes


def _pad(frame: Image.Image, height: int) -> Image.Image:
    if frame.height == height:
        return frame
    padded = Image.new("RGB", (frame.width, height), "white")
    padded.paste(frame, (0, 0))
    return padded


def _verdict(text: str, truth: str | None) -> str:
    if truth is None:
        return ""
    return "  (correct)" if normalise_answer(text) == truth else f"  (expected {truth})"


def run_eval(args: argparse.Namespace) -> int:
    model, processor = load_demo(args.model)
    result = evaluate(model, processor, args.seed, args.n, progress=args.progress)
    for kind, acc in result["per_type"].items():
        print(f"{kind:>9}: {100 * acc:5.1f}%  ({result['counts'][kind]} questions)")
    described = evaluate_descriptions(model, processor, args.seed, args.n_descriptions, progress=args.progress)
    for count, acc in described["per_objects"].items():
        label = f"{count} object{'s' if count > 1 else ''}"
        print(f"description, {label:>9}: {100 * acc:5.1f}%  ({described['counts'][count]} scenes)")
    print(f"one-word accuracy: {100 * result['accuracy']:.1f}%")
    print(f"description accuracy: {100 * described['accuracy']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit("use `llada-v demo` or `llada-v eval-demo`")
