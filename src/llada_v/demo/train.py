"""Train the embedded demo model: a tiny LLaDA-V learns a synthetic task of shapes from scratch.

    python -m llada_v.demo.train --output-dir OUT [--task shapes|scenes] [--seed 0] [--train-samples 32000]
        [--stage1-steps 300] [--stage2-steps 4000] [--batch-size 16] [--vision-pretrain-steps 2400]
        [--description-every 3]
        [--description-order both] [--question-weights shape=3,leftmost=2]
        [--mask-sampling count] [--no-curriculum]
        [--vision-lr 2e-5] [--projector-lr 2e-4] [--language-lr 1e-3] [--device cpu] [--dataloader-workers 0]

The run goes through this project's own pipeline end to end: `demo_task` renders scenes, `LladaVDataset`
applies the chat template, `LladaVDataCollator` pads, `LladaVTrainer` trains Stage 1 (projector only) then
Stage 2 (everything) with the masked-diffusion loss of `LladaVModel`, and the result is saved with its
processor, generation defaults and remote code. Before them, Stage 0 (`pretrain_vision`) stands in for the
pretrained SigLIP that the released model starts from: the vision tower alone learns dense labels of the
training scenes (which shape and colour cover each patch). Three choices make the small language model learn
in time (docs/demo.md): count-form masking (`MaskCountSampling`), scene descriptions in the training data, and
supervised EOS after the last answer up to the sampler's canvas. `--task scenes` trains the scenes task
(`llada_v.demo.scenes`: one to five shapes with sizes, descriptions of up to 23 words) with its own recipe
(`TASK_RECIPES`: a larger model, canvases of 8 to 64 tokens drawn per sample, and after Stage 2 a curriculum,
`SCENES_CURRICULUM`, that asks one question type at a time before mixing them again; the shipped model's
recipe). Deterministic given the seed
(CPU, fixed thread count). The learning rates are higher than the
paper's (1e-3 instead of 1e-5): the paper fine-tunes pretrained towers, this model starts from random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.utils.data import Dataset
from transformers import TrainingArguments, set_seed

from ..checkpoint_io import atomic_folder, write_remote_code
from ..generation_utils import LladaVGenerationConfig
from ..modeling_llada_v import LladaVModel
from ..processing_llada_v import LladaVProcessor
from ..training.data import (
    IGNORE_INDEX,
    MASK_SAMPLING,
    LladaVDataCollator,
    LladaVDataset,
    MaskCountSampling,
    TemplateTokens,
    find_turns,
)
from ..training.trainer import LladaVTrainer, set_trainable
from .model import build_demo_processor, build_demo_tokenizer, demo_config
from .task import COLORS, DESCRIPTION_ORDERS, QUESTION_TYPES, SHAPES, check_question_weights, draw_object
from .tasks import DEFAULT_TASK, get_task

logger = logging.getLogger(__name__)

TRAIN_SEED_OFFSET = 1_000_000  # training scenes use seeds >= this; held-out sets use seeds below it
# The demo's sampler defaults: one-word answers, so a 4-token canvas decoded in 4 steps.
DEMO_GENERATION = dict(max_new_tokens=4, steps=4, block_length=4)
# The scenes task's: a 32-token canvas (the longest description is 24 tokens with its `<|eot_id|>`) in blocks of
# 8, one token per step (a one-word answer stops after its first block). Training teaches every canvas from 8 to
# 64 tokens (`SCENES_CANVAS`).
SCENES_GENERATION = dict(max_new_tokens=32, steps=32, block_length=8)
SCENES_CANVAS = (8, 64)
# The vision tower moves 50x slower than the rest (the paper's ratio is 5x at 2e-6 vs 1e-5): while the
# language model still ignores the image, its gradients are tiny and noisy, and Adam at full rate lets the
# random tower drift until every patch maps to the same vector.
STAGE2_LEARNING_RATES = {"vision": 2e-5, "projector": 2e-4, "language": 1e-3}
STAGE1_LEARNING_RATES = {"projector": 1e-3}
TRAIN_SAMPLES = 32_000
STAGE1_STEPS = 300
STAGE2_STEPS = 4000  # batches of 16: 2 epochs of the 32,000 samples
# Stage 0, the demo's stand-in for a pretrained SigLIP: every patch token of every crop learns which shape and
# which colour cover its patch (dense labels rendered from the scene's objects), and on the whole-image base crop
# also which object it is counting from the left; the mean-pooled tokens also learn which shapes and colours the
# scene holds (tags). Throw-away linear heads read the tokens that feed the projector.
SHAPE_CLASSES = ("background", *SHAPES)
COLOR_CLASSES = ("background", *sorted(COLORS))
# Objects counted from the left: a task with at most N objects uses the first N + 1 classes.
ORDER_CLASSES = ("background", "first", "second", "third", "fourth", "fifth")
SIZE_CLASSES = ("background", "small", "big")  # the scenes task's sizes
VISION_TAGS = (*SHAPES, *sorted(COLORS))
# The scenes task's tiles hold one object each: every patch token of a tile also learns that object (or
# "background"), so that any one token of the tile says what the slot holds.
TILE_CLASSES = {"shape": SHAPE_CLASSES, "color": COLOR_CLASSES, "size": SIZE_CLASSES}
VISION_PRETRAIN = {"steps": 2400, "batch_size": 16, "learning_rate": 1e-3}
# One training sample in this many is a scene description ("red circle blue square"), naming every object with
# its colour. Without descriptions the model leaves colour questions at chance even with perfect vision
# features; with them it answers them (docs/demo.md, "How it was trained").
DESCRIPTION_EVERY = 3
# "both": descriptions alternate between left-to-right ("Which shapes are there?") and colour-name order ("Which
# colors are there?"). Colour order makes the model find each colour in the image and name the shape there, the
# skill "Which shape is blue?" needs; left order keeps "Which shape is on the left?" (docs/demo.md).
DESCRIPTION_MODES = (*DESCRIPTION_ORDERS, "both")
DESCRIPTION_ORDER = "both"
# Relative weights of the question types in the training questions (1 where not given); held-out sets ask every
# type equally often. "Which shape is <colour>?" is the type the model learns last, "Which shape is on the left?"
# the one that suffers most when shape questions dominate (docs/demo.md).
QUESTION_WEIGHTS = {"shape": 3.0, "leftmost": 2.0}
# The questions that name an object ("What color is the circle?", "Which shape is blue?", "Is there a triangle?"):
# the model has to find that object in the picture.
CONTENT_TYPES = ("color", "shape", "exists")
# The scenes task's last stages, after Stage 2 (docs/history/demo-runs.md, runs 37-45). Mixed with descriptions and
# the other types, the content questions' signal is too small for the model ever to look at the object the question
# names: it answers from the type's prior. A stage of one type alone finds that lookup after 200-250 steps at full
# rate (a 300-step stage decays its rate too soon: run 44), and once found, mixed training keeps it. Each entry is
# either `questions` (one question per sample, the types in turn;
# content types about scenes of two or more shapes; canvas 2: the answer and its `<|eot_id|>`, no padding) or `mix`
# (Stage 2's data with a description every `mix` samples and Stage 2's canvases), with `steps` and `rate` (times
# the Stage 2 learning rates; 1 where not given). The low-rate mixes bring the descriptions and the EOS padding back.
SCENES_CURRICULUM = (
    dict(questions=("color",), steps=1000),
    dict(questions=("shape",), steps=1000),
    dict(questions=("exists",), steps=1000),
    dict(mix=2, steps=600),
    dict(questions=("color", "shape", "exists", "color", "shape", "exists", "count", "leftmost"), steps=600),
    dict(mix=3, steps=600, rate=0.2),
    dict(questions=("color", "shape", "shape", "exists", "shape", "count", "shape", "leftmost"), steps=600),
    dict(mix=3, steps=600, rate=0.2),
)
# Each task's defaults (every one a flag of the command). The scenes task: a description every second sample
# (they teach the model to read the picture), in both orders, EOS padding up to a canvas drawn per sample from 8
# to 64 tokens, a wider language model (`llada_v.demo.model.TASK_MODELS`), a longer Stage 0 (its tile labels),
# and the questions that find an object by what it is asked three times as often (35 minutes on 2 CPU cores; with
# `SCENES_CURRICULUM` after it, the shipped model's recipe, 73).
TASK_RECIPES = {
    "shapes": dict(
        train_samples=TRAIN_SAMPLES, stage1_steps=STAGE1_STEPS, stage2_steps=STAGE2_STEPS,
        vision_pretrain_steps=VISION_PRETRAIN["steps"], description_every=DESCRIPTION_EVERY,
        canvas=DEMO_GENERATION["max_new_tokens"], generation=DEMO_GENERATION, description_order=DESCRIPTION_ORDER,
        question_weights=QUESTION_WEIGHTS, curriculum=(),
    ),
    "scenes": dict(
        train_samples=32_000, stage1_steps=200, stage2_steps=4500, vision_pretrain_steps=3000, description_every=2,
        canvas=SCENES_CANVAS, generation=SCENES_GENERATION, description_order="both",
        question_weights={"color": 3.0, "shape": 3.0, "exists": 3.0}, curriculum=SCENES_CURRICULUM,
    ),
}  # fmt: skip


def write_training_data(
    folder: Path,
    num_samples: int,
    seed: int,
    description_every: int = DESCRIPTION_EVERY,
    description_order: str = DESCRIPTION_ORDER,
    question_weights: dict[str, float] | None = None,
    task: str = DEFAULT_TASK,
) -> Path:
    """Render `num_samples` scenes of `task` as PNG files plus a LLaVA-format JSON list; returns the JSON path.

    One sample in `description_every` (0: none) is a scene description (`demo_task.describe`); of the others
    about one in four is a two-turn conversation about the same image (the scenes task counts only the question
    samples, one in four of them: with a description every second sample, one sample in four would never be a
    question). `description_order` is `describe`'s
    order, or `"both"`: the descriptions alternate between the orders. `question_weights` (type -> relative
    weight; `None`: `QUESTION_WEIGHTS`, `{}`: uniform) weights the question types.
    """
    if description_order not in DESCRIPTION_MODES:
        raise ValueError(f"description_order must be one of {DESCRIPTION_MODES}, got {description_order!r}")
    if description_every < 0:
        raise ValueError(f"description_every must be >= 0 (0: no descriptions), got {description_every}")
    weights = QUESTION_WEIGHTS if question_weights is None else question_weights
    check_question_weights(weights, turns=2)  # before anything is written
    module = get_task(task)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    descriptions = questions = 0
    for i in range(num_samples):
        sample_seed = TRAIN_SEED_OFFSET + seed * num_samples + i
        if description_every and i % description_every == description_every - 1:
            scene = module.draw_scene(random.Random(sample_seed))
            order = DESCRIPTION_ORDERS[descriptions % 2] if description_order == "both" else description_order
            descriptions += 1
            sample = {"image": scene.image, "qa": [module.describe(scene, order)], "objects": scene.objects}
        else:
            two_turn = (questions if task == "scenes" else i) % 4 == 3
            sample = module.make_sample(sample_seed, turns=2 if two_turn else 1, weights=weights)
            questions += 1
        records.append(_save_sample(folder, i, sample["image"], sample["qa"], sample["objects"]))
    return _write_records(folder, records)


def write_question_data(folder: Path, num_samples: int, seed: int, kinds: tuple[str, ...], task: str = "scenes",
                        stream: int = 2) -> Path:  # fmt: skip
    """Render `num_samples` one-question samples of `task` (types from `kinds` in turn) like `write_training_data`;
    returns the JSON path. Colour, shape and existence questions (`CONTENT_TYPES`) are about scenes of two or more
    shapes: with one shape the answer can be read without finding the object the question names. Scene seeds are
    integers from `stream * TRAIN_SEED_OFFSET` on (`stream` >= 2: apart from `write_training_data`'s)."""
    unknown = [kind for kind in kinds if kind not in QUESTION_TYPES]
    if not kinds or unknown:
        raise ValueError(f"kinds must be question types from {QUESTION_TYPES}, got {kinds!r}")
    if stream < 2:
        raise ValueError(f"stream must be >= 2 (1 is write_training_data's), got {stream}")
    module = get_task(task)
    if not hasattr(module, "draw_scene_for"):
        raise ValueError(f"write_question_data needs the scenes task, got {task!r}")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_samples):
        kind = kinds[i % len(kinds)]
        rng = random.Random(stream * TRAIN_SEED_OFFSET + seed * num_samples + i)
        scene = module.draw_scene_for(rng, kind, min_objects=2 if kind in CONTENT_TYPES else 1)
        question, answer = module.ask(scene, kind, rng)
        records.append(_save_sample(folder, i, scene.image, [(question, answer)], scene.objects))
    return _write_records(folder, records)


def _save_sample(folder: Path, index: int, image, qa: list[tuple[str, str]], objects) -> dict:
    """Save sample `index`'s image into `folder`; returns its LLaVA-format record (the image token in the first
    turn) with the objects drawn."""
    name = f"{index:06d}.png"
    image.save(folder / name)
    conversations = []
    for turn, (question, answer) in enumerate(qa):
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": index, "image": name, "conversations": conversations,
            "objects": [_object_record(o) for o in objects]}  # fmt: skip


def _write_records(folder: Path, records: list[dict]) -> Path:
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def _object_record(obj) -> dict:
    sized = {"size": obj.size} if obj.size is not None else {}  # the scenes task's objects have sizes
    return {"shape": obj.shape, "color": obj.color, **sized, "box": list(obj.box)}


def object_coverage(size: tuple[int, int], objects: list[dict], processor: LladaVProcessor) -> torch.Tensor:
    """How much of every patch of every crop each object covers: `(crops, patches, len(objects))` in [0, 1].

    The objects are painted as pure red / green / blue on black, three at a time, and each picture goes through
    the image processor itself, so the crops, tiling, padding and resizing are exactly those of the real image;
    the normalisation is undone and each channel averaged over each patch.
    """
    if not objects:
        raise ValueError("object_coverage needs at least one object")
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    parts = []
    for first in range(0, len(objects), 3):
        group = objects[first : first + 3]
        picture = Image.new("RGB", size, (0, 0, 0))
        draw = ImageDraw.Draw(picture)
        for channel, obj in enumerate(group):
            fill = tuple(255 if c == channel else 0 for c in range(3))
            draw_object(draw, obj["shape"], tuple(obj["box"]), fill)
        crops = image_processor(picture, return_tensors="pt")["pixel_values"]
        share = (crops * std + mean).clamp(0, 1)  # bicubic resizing over- and undershoots a little
        share = nn.functional.avg_pool2d(share, image_processor.patch_size)  # row-major patches as in SigLIP
        parts.append(share.flatten(2).transpose(1, 2)[..., : len(group)])
    return torch.cat(parts, dim=-1)


def patch_targets(
    coverage: torch.Tensor, objects: list[dict], max_objects: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft per-patch class distributions (shape, colour, order from the left among `max_objects + 1` classes,
    size: "big" for objects without one) from `object_coverage`."""
    background = (1 - coverage.sum(-1, keepdim=True)).clamp(min=0)
    by_left = sorted(range(len(objects)), key=lambda k: objects[k]["box"][0] + objects[k]["box"][2])

    def classes(names: tuple[str, ...], label_of) -> torch.Tensor:
        target = torch.zeros(*coverage.shape[:2], len(names))
        target[..., :1] = background
        for k, obj in enumerate(objects):
            target[..., names.index(label_of(k, obj))] += coverage[..., k]
        return target / target.sum(-1, keepdim=True)

    return (
        classes(SHAPE_CLASSES, lambda k, obj: obj["shape"]),
        classes(COLOR_CLASSES, lambda k, obj: obj["color"]),
        classes(ORDER_CLASSES[: max_objects + 1], lambda k, obj: ORDER_CLASSES[1 + by_left.index(k)]),
        classes(SIZE_CLASSES, lambda k, obj: obj.get("size", "big")),
    )


def tile_targets(coverage: torch.Tensor, objects: list[dict]) -> tuple[torch.Tensor, ...]:
    """The class indices (shape, colour, size; `TILE_CLASSES`) of the object that covers most of each crop of
    `coverage` (`(crops, patches, objects)`, `object_coverage`'s), "background" where none covers a patch's worth."""
    totals = coverage.sum(1)  # (crops, objects): patches' worth of each object in each crop
    best, main = totals.max(-1)
    present = best >= 1.0
    labels = []
    for name, classes in TILE_CLASSES.items():
        index = torch.tensor([classes.index(obj.get(name, "big")) for obj in objects])
        labels.append(torch.where(present, index[main], 0))
    return tuple(labels)


def _add_tile_loss(loss: torch.Tensor, heads: nn.ModuleDict, hidden: torch.Tensor, base_rows: list[int],
                   counts: list[int], targets: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:  # fmt: skip
    """`loss` plus Stage 0's tile labels, term by term: every patch token of every tile (not the base crops, rows
    `base_rows`) learns its tile's object (`tile_targets` per image in `targets`; `counts`: crops per image)."""
    tiles = torch.cat([hidden[base + 1 : base + count] for base, count in zip(base_rows, counts)])
    for name, target in zip(TILE_CLASSES, (torch.cat(t) for t in zip(*targets))):
        logits = heads[f"tile_{name}"](tiles)  # (tiles, patches, classes): every patch learns its tile's label
        loss = loss + nn.functional.cross_entropy(
            logits.flatten(0, 1), target.to(hidden.device).repeat_interleave(logits.shape[1])
        )
    return loss


def pretrain_vision(
    model: LladaVModel,
    data_path: Path,
    processor: LladaVProcessor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    task: str = DEFAULT_TASK,
) -> list[float]:
    """Stage 0: train the vision tower alone on dense scene labels; returns the loss every `steps // 20` steps.

    The released LLaDA-V starts from a pretrained SigLIP; no such tower exists at the demo's size, and one
    trained from scratch only through the language model does not learn shapes: while its random features carry
    no usable shape information, the language model learns to answer shape questions from priors and the vision
    gradient vanishes (measured: patch-embedding gradient ~1e-4, and shape accuracy at chance whatever the
    vision learning rate). So the demo pretrains the tower first, on the training images only: every crop of an
    image (anyres tiling as in training) goes through the layers that feed the projector, and linear heads
    (discarded afterwards) predict from each patch token the shape and the colour covering that patch, and on the
    base crop which object from the left it is (soft cross-entropy against the covered fractions, so the tokens
    carry shape and colour where the object is: what the language model has to match question words against).
    A fourth head predicts from the mean-pooled tokens which shapes and colours the scene holds (binary
    cross-entropy). For the scenes task a fifth head predicts from each patch token the size of the object covering
    it, and three more the object of the patch's tile (`_add_tile_loss`). The language model and projector are
    untouched.
    """
    records = json.loads(data_path.read_text())
    folder = data_path.parent
    vision = model.vision_tower
    width = model.config.vision_config.hidden_size
    max_objects, sized = get_task(task).MAX_OBJECTS, task == "scenes"
    scenes_heads = {"size": SIZE_CLASSES, **{f"tile_{n}": c for n, c in TILE_CLASSES.items()}} if sized else {}
    heads = nn.ModuleDict(
        {
            "shape": nn.Linear(width, len(SHAPE_CLASSES)),
            "color": nn.Linear(width, len(COLOR_CLASSES)),
            "order": nn.Linear(width, max_objects + 1),
            **{name: nn.Linear(width, len(classes)) for name, classes in scenes_heads.items()},
            "tags": nn.Linear(width, len(VISION_TAGS)),
        }
    )
    # Parameters the feature does not use (post_layernorm) get no gradient, so AdamW leaves them as they are.
    optimizer = torch.optim.AdamW([*vision.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(vision.parameters()).device
    heads.to(device)

    def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(target * logits.log_softmax(-1)).sum(-1).mean()

    losses, window = [], []
    vision.train()
    for step in range(steps):
        picks = torch.randint(len(records), (batch_size,), generator=generator).tolist()
        crops, shape_t, color_t, order_t, size_t, base_rows, tile_t = [], [], [], [], [], [], []
        tags = torch.zeros(batch_size, len(VISION_TAGS))
        for row, index in enumerate(picks):
            record = records[index]
            for obj in record["objects"]:
                tags[row, VISION_TAGS.index(obj["shape"])] = tags[row, VISION_TAGS.index(obj["color"])] = 1.0
            with Image.open(folder / record["image"]) as image:
                image = image.convert("RGB")
            pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
            coverage = object_coverage(image.size, record["objects"], processor)
            targets = patch_targets(coverage, record["objects"], max_objects)
            base_rows.append(sum(c.shape[0] for c in crops))  # the base crop comes first in each image
            crops.append(pixel_values)
            shape_t.append(targets[0])
            color_t.append(targets[1])
            order_t.append(targets[2][0])
            size_t.append(targets[3])
            if sized:
                tile_t.append(tile_targets(coverage[1:], record["objects"]))
        hidden = model.encode_vision(torch.cat(crops).to(device))  # (crops, patches, width)
        loss = (
            soft_cross_entropy(heads["shape"](hidden), torch.cat(shape_t).to(device))
            + soft_cross_entropy(heads["color"](hidden), torch.cat(color_t).to(device))
            + soft_cross_entropy(heads["order"](hidden[base_rows]), torch.stack(order_t).to(device))
        )
        if sized:
            loss = loss + soft_cross_entropy(heads["size"](hidden), torch.cat(size_t).to(device))
            loss = _add_tile_loss(loss, heads, hidden, base_rows, [c.shape[0] for c in crops], tile_t)
        pooled = torch.stack([part.mean(dim=(0, 1)) for part in torch.split(hidden, [c.shape[0] for c in crops])])
        loss = loss + nn.functional.binary_cross_entropy_with_logits(heads["tags"](pooled), tags.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % max(1, steps // 20) == 0:
            losses.append(sum(window) / len(window))
            window = []
            logger.info("stage 0: step %d/%d, loss %.3f", step + 1, steps, losses[-1])
    return losses


class AnswerOnlyLabels(Dataset):
    """The demo's labels: only the assistant answers (words + `<|eot_id|>`) are supervised, and the last answer
    is followed by supervised EOS up to a canvas of `canvas` tokens.

    The official rule (docs/parity.md Q20) also supervises every template token, so a one-word answer is about a
    tenth of each sample's loss and the model learns the (easy) template and the answer priors long before it
    learns to look at the image. The demo keeps the answer's share whole; the released model's rule is unchanged
    in `LladaVDataset`.

    The EOS padding is LLaDA's supervised EOS padding (docs/parity.md Q21): the sampler starts from
    `max_new_tokens` masks at the end of the sequence, so the model has to know that masks after a short answer
    and its `<|eot_id|>` are filler. Without it a model trained on answers of different lengths reads the length
    of the answer from the number of masks and fills the canvas with a longer "answer" (measured).

    `canvas`: a fixed number of tokens, or a `(low, high)` range: each sample then draws its canvas from
    `low..high` (log-uniformly, so short and long canvases are both common), a pure function of `seed` and the
    sample's index, so that the model answers on any canvas in the range.
    """

    def __init__(
        self, dataset: LladaVDataset, tokens: TemplateTokens, eos_token_id: int, canvas: int | tuple[int, int],
        seed: int = 0,
    ):  # fmt: skip
        low, high = (canvas, canvas) if isinstance(canvas, int) else canvas
        if not 1 <= low <= high:
            raise ValueError(f"canvas must be at least 1 token (and low <= high for a range), got {canvas}")
        self.dataset, self.tokens = dataset, tokens
        self.eos_token_id, self.canvas, self.seed = eos_token_id, (low, high), seed

    def __len__(self) -> int:
        return len(self.dataset)

    def canvas_of(self, index: int) -> int:
        """The canvas of sample `index`: log-uniform over `low..high`, seeded by (`seed`, `index`)."""
        low, high = self.canvas
        if low == high:
            return low
        u = random.Random(f"canvas-{self.seed}-{index}").random()
        return min(high, int(low * ((high + 1) / low) ** u))

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        ids = item["input_ids"].tolist()
        labels = torch.full_like(item["labels"], IGNORE_INDEX)
        header_end = len(ids)
        for turn in find_turns(ids, self.tokens):
            if turn.is_assistant:
                # The answer starts after `<|start_header_id|>assistant<|end_header_id|>\n\n`.
                header_end = ids.index(self.tokens.end_header_id, turn.start) + 1
                labels[header_end : turn.end] = item["input_ids"][header_end : turn.end]
        # The last answer runs to the end of the sequence; pad it with EOS up to the canvas.
        missing = self.canvas_of(index) - (len(ids) - header_end)
        if missing > 0:
            padding = torch.full((missing,), self.eos_token_id, dtype=item["input_ids"].dtype)
            item["input_ids"] = torch.cat((item["input_ids"], padding))
            labels = torch.cat((labels, padding))
        item["labels"] = labels
        return item


def _args(
    output_dir: Path, steps: int, batch_size: int, seed: int, warmup: int, device: str, workers: int
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-3,  # replaced per module group by LladaVTrainer
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=workers,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )


def train_demo(
    output_dir: Path,
    seed: int = 0,
    train_samples: int | None = None,
    stage1_steps: int | None = None,
    stage2_steps: int | None = None,
    batch_size: int = 16,
    work_dir: Path | None = None,
    learning_rates: dict[str, float] | None = None,
    device: str = "cpu",
    dataloader_workers: int = 0,
    vision_pretrain_steps: int | None = None,
    description_every: int | None = None,
    description_order: str | None = None,
    mask_sampling: str = "count",
    question_weights: dict[str, float] | None = None,
    task: str = DEFAULT_TASK,
    curriculum: tuple[dict, ...] | None = None,
) -> dict:
    """Train and save the demo model for `task` (`"shapes"`, the default, or `"scenes"`) into `output_dir`
    (atomically). Returns a summary with the losses. Settings left at None take the task's `TASK_RECIPES` value.

    `learning_rates` overrides entries of the Stage 2 rates (`vision`, `projector`, `language`). The shipped
    model is trained on CPU with the defaults; `device="cuda"` (and data-loader workers) are for exploring
    settings faster: a GPU run is not bit-identical to the CPU run. `description_every` (0: none) and
    `mask_sampling` (`"count"`: `MaskCountSampling`; `"time"`: the model's own `t ~ U(0, 1)`),
    `description_order` and `question_weights` (`write_training_data`'s) exist to measure what they bring
    (docs/demo.md). `curriculum`: the stages after Stage 2 (`SCENES_CURRICULUM`'s form; `()`: none).
    """
    recipe = _recipe(task, train_samples=train_samples, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
                     vision_pretrain_steps=vision_pretrain_steps, description_every=description_every,
                     description_order=description_order, question_weights=question_weights,
                     curriculum=curriculum)  # fmt: skip
    train_samples, stage1_steps, stage2_steps = recipe["train_samples"], recipe["stage1_steps"], recipe["stage2_steps"]
    vision_pretrain_steps, description_every = recipe["vision_pretrain_steps"], recipe["description_every"]
    description_order, question_weights = recipe["description_order"], recipe["question_weights"]
    rates2 = _check_settings(
        learning_rates, device, dataloader_workers, vision_pretrain_steps, mask_sampling,
        {"train_samples": train_samples, "stage2_steps": stage2_steps, "batch_size": batch_size},
        stage1_steps,
    )  # fmt: skip
    _check_curriculum(recipe["curriculum"])
    output_dir = Path(output_dir)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    set_seed(seed)
    started = time.time()

    model, processor = _new_model(task, recipe["generation"])
    config = model.config

    scratch = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="llada_v_demo_"))
    try:
        data_path = write_training_data(
            scratch / "data", train_samples, seed, description_every, description_order, question_weights, task
        )
        dataset, collator = _dataset(data_path, processor, config.eos_token_id, recipe["canvas"], seed, mask_sampling)
        history = {}
        if vision_pretrain_steps:
            model.to(device)
            history["stage0"] = pretrain_vision(
                model, data_path, processor, vision_pretrain_steps, VISION_PRETRAIN["batch_size"],
                VISION_PRETRAIN["learning_rate"], seed, task,
            )  # fmt: skip
            logger.info(
                "stage 0 (vision, dense scene labels): loss %.3f -> %.3f", history["stage0"][0], history["stage0"][-1]
            )
        stages = [
            ("1", stage1_steps, ("projector",), STAGE1_LEARNING_RATES),
            ("2", stage2_steps, ("vision", "projector", "language"), rates2),
        ]
        for stage, steps, groups, rates in stages:
            if steps:
                args = _args(scratch / f"stage{stage}", steps, batch_size, seed, warmup=max(1, steps // 20),
                             device=device, workers=dataloader_workers)  # fmt: skip
                history[f"stage{stage}"] = _train_stage(model, stage, groups, rates, args, dataset, collator)
        history |= _run_curriculum(model, processor, recipe, rates2, scratch, seed, batch_size, task,
                                   dict(device=device, workers=dataloader_workers), mask_sampling)  # fmt: skip
        set_trainable(model, ("vision", "projector", "language"))
        model.to("cpu")
        save_demo(model, processor, output_dir)
    finally:
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"seconds": time.time() - started, "losses": history, "output_dir": str(output_dir)}


def _run_curriculum(
    model: LladaVModel, processor: LladaVProcessor, recipe: dict, rates2: dict[str, float], scratch: Path, seed: int,
    batch_size: int, task: str, run: dict, mask_sampling: str,
) -> dict[str, list[float]]:  # fmt: skip
    """The stages of `recipe["curriculum"]` after Stage 2 (`SCENES_CURRICULUM`), each on data of its own in
    `scratch`; returns their losses as `stage3.1`, `stage3.2`, ... (`run`: `_args`' device and workers)."""
    history = {}
    for number, entry in enumerate(recipe["curriculum"], start=1):
        folder, steps = scratch / f"stage3.{number}", entry["steps"]
        if "questions" in entry:
            data = write_question_data(folder / "data", steps * batch_size, seed, entry["questions"], task,
                                       stream=1 + number)  # fmt: skip
        else:
            data = write_training_data(folder / "data", steps * batch_size, seed + 100 * number, entry["mix"],
                                       recipe["description_order"], recipe["question_weights"], task)  # fmt: skip
        canvas = 2 if "questions" in entry else recipe["canvas"]  # the answer and its <|eot_id|>
        stage_data = _dataset(data, processor, model.config.eos_token_id, canvas, seed, mask_sampling)
        rates = {group: rate * entry.get("rate", 1.0) for group, rate in rates2.items()}
        args = _args(folder, steps, batch_size, seed, warmup=max(1, steps // 20), **run)
        history[f"stage3.{number}"] = _train_stage(model, f"3.{number}", ("vision", "projector", "language"),
                                                   rates, args, *stage_data)  # fmt: skip
    return history


def _dataset(data_path: Path, processor: LladaVProcessor, eos_token_id: int, canvas, seed: int, mask_sampling: str):
    """The training dataset of `data_path` (answers supervised, EOS padding up to `canvas`) and its collator."""
    dataset = AnswerOnlyLabels(
        LladaVDataset(data_path, processor, image_folder=data_path.parent, system_prompt=None),
        TemplateTokens.from_processor(processor),
        eos_token_id=eos_token_id,
        canvas=canvas,
        seed=seed,
    )
    collator = LladaVDataCollator.from_processor(processor, padding="masked")
    if mask_sampling == "count":
        # The same objective with bounded weights: one-word answers make the default estimator very noisy.
        collator = MaskCountSampling(collator, seed)
    return dataset, collator


def _check_curriculum(curriculum: tuple[dict, ...]) -> None:
    """Each entry of a curriculum (`SCENES_CURRICULUM`'s form) names `questions` or `mix`, positive `steps` and
    optionally a positive `rate`."""
    for number, entry in enumerate(curriculum, start=1):
        keys = set(entry)
        questions = entry.get("questions", ())
        problems = [
            ("exactly one of 'questions' and 'mix'", ("questions" in keys) == ("mix" in keys)),
            ("no keys beyond questions, mix, steps, rate", bool(keys - {"questions", "mix", "steps", "rate"})),
            ("steps >= 1", not (isinstance(entry.get("steps"), int) and entry["steps"] >= 1)),
            ("rate > 0", not entry.get("rate", 1.0) > 0),
            ("mix >= 1", "mix" in keys and not (isinstance(entry["mix"], int) and entry["mix"] >= 1)),
            (f"questions from {QUESTION_TYPES}", "questions" in keys
             and (not questions or any(kind not in QUESTION_TYPES for kind in questions))),
        ]  # fmt: skip
        broken = [rule for rule, bad in problems if bad]
        if broken:
            raise ValueError(f"curriculum entry {number} {entry!r} needs {'; '.join(broken)}")


def _new_model(task: str, generation: dict) -> tuple[LladaVModel, LladaVProcessor]:
    """A freshly initialised demo model for `task` (generation defaults `generation`) and its processor."""
    tokenizer = build_demo_tokenizer(task)
    config = demo_config(tokenizer, task)
    config._attn_implementation = "eager"  # on CPU, eager trains ~4x faster than sdpa with a padding mask
    processor = build_demo_processor(config, tokenizer)
    model = LladaVModel(config)
    model.generation_config = LladaVGenerationConfig.from_model_config(config)
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    return model, processor


def _recipe(task: str, **settings: int | str | None) -> dict:
    """`task`'s recipe (`TASK_RECIPES`) with the `settings` that are not None."""
    if task not in TASK_RECIPES:
        raise ValueError(f"unknown demo task {task!r}; expected one of {sorted(TASK_RECIPES)}")
    return {**TASK_RECIPES[task], **{key: value for key, value in settings.items() if value is not None}}


def _check_settings(
    learning_rates: dict[str, float] | None,
    device: str,
    dataloader_workers: int,
    vision_pretrain_steps: int,
    mask_sampling: str,
    positive: dict[str, int],
    stage1_steps: int,
) -> dict[str, float]:
    """Validate `train_demo`'s settings before anything runs; returns the Stage 2 learning rates."""
    if mask_sampling not in MASK_SAMPLING:
        raise ValueError(f"mask_sampling must be one of {MASK_SAMPLING}, got {mask_sampling!r}")
    rates2 = dict(STAGE2_LEARNING_RATES)
    for name, value in (learning_rates or {}).items():
        if name not in rates2:
            raise ValueError(f"unknown learning-rate group {name!r}; expected one of {sorted(rates2)}")
        if not value > 0:
            raise ValueError(f"learning rate for {name!r} must be positive, got {value}")
        rates2[name] = value
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no CUDA device")
    if dataloader_workers < 0:
        raise ValueError(f"dataloader_workers must be >= 0, got {dataloader_workers}")
    if vision_pretrain_steps < 0:
        raise ValueError(f"vision_pretrain_steps must be >= 0, got {vision_pretrain_steps}")
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if stage1_steps < 0:
        raise ValueError(f"stage1_steps must be >= 0, got {stage1_steps}")
    return rates2


def _train_stage(
    model: LladaVModel,
    stage: str,
    groups: tuple[str, ...],
    rates: dict[str, float],
    args: TrainingArguments,
    dataset: Dataset,
    collator,
) -> list[float]:
    """One Trainer stage on the module `groups` with per-group learning `rates`; returns its logged losses."""
    set_trainable(model, groups)
    trainer = LladaVTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                            learning_rates=rates)  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    logger.info("stage %s: loss %.3f -> %.3f", stage, losses[0], losses[-1])
    return losses


def save_demo(model: LladaVModel, processor: LladaVProcessor, output_dir: Path) -> None:
    """Save model, processor and remote code into `output_dir` via a temporary folder renamed into place."""
    with atomic_folder(output_dir, overwrite=True) as tmp:
        model.config._attn_implementation = None  # let the loader pick (sdpa by default)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_remote_code(tmp)


def _format_weights(weights: dict[str, float]) -> str:
    return ",".join(f"{kind}={value:g}" for kind, value in weights.items()) or "uniform"


def _question_weights(text: str) -> dict[str, float]:
    """`--question-weights`: 'uniform' or comma-separated `type=weight` pairs."""
    if text.strip() == "uniform":
        return {}
    weights = {}
    for part in text.split(","):
        kind, sep, value = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in QUESTION_TYPES:
            raise argparse.ArgumentTypeError(
                f"expected 'uniform' or type=weight pairs with types from {QUESTION_TYPES}, got {part!r}"
            )
        try:
            weights[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} must be a number, got {value!r}") from None
        if not weights[kind] >= 0:
            raise argparse.ArgumentTypeError(f"weight of {kind!r} must be >= 0, got {value!r}")
    return weights


def _parser() -> argparse.ArgumentParser:
    SCENES = TASK_RECIPES["scenes"]  # noqa: N806  (the scenes defaults in the help texts)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--task", choices=tuple(TASK_RECIPES), default=DEFAULT_TASK,
        help="shapes (default: the shipped model's task) or scenes (1-5 shapes with sizes, long descriptions); "
        "the settings below default to the task's recipe (shown for shapes)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-samples", type=int, default=None, help=f"default {TRAIN_SAMPLES} (scenes: {SCENES['train_samples']})"
    )
    parser.add_argument(
        "--stage1-steps", type=int, default=None, help=f"default {STAGE1_STEPS} (scenes: {SCENES['stage1_steps']})"
    )
    parser.add_argument(
        "--stage2-steps", type=int, default=None, help=f"default {STAGE2_STEPS} (scenes: {SCENES['stage2_steps']})"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    for group, rate in STAGE2_LEARNING_RATES.items():
        parser.add_argument(f"--{group}-lr", type=float, default=rate, help=f"Stage 2 learning rate (default {rate})")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu (default: the reproducible run) or cuda (faster exploration, not bit-identical)",
    )
    parser.add_argument("--dataloader-workers", type=int, default=0)
    parser.add_argument(
        "--vision-pretrain-steps",
        type=int,
        default=None,
        help=f"Stage 0 steps (vision tower learns dense scene labels; 0 skips it; default {VISION_PRETRAIN['steps']}, "
        f"scenes: {SCENES['vision_pretrain_steps']})",
    )
    parser.add_argument(
        "--description-every",
        type=int,
        default=None,
        help=f"one training sample in N is a scene description (0: none; default {DESCRIPTION_EVERY}, scenes: "
        f"{SCENES['description_every']})",
    )
    parser.add_argument(
        "--description-order",
        choices=DESCRIPTION_MODES,
        default=None,
        help="objects of a description from the left, by colour name, or both orders alternating "
        f"(default {DESCRIPTION_ORDER}, scenes: {SCENES['description_order']})",
    )
    parser.add_argument(
        "--question-weights",
        type=_question_weights,
        default=None,
        help="relative weights of the training question types, e.g. 'shape=3,color=1' (1 where not "
        f"given; 'uniform': all 1; default {_format_weights(QUESTION_WEIGHTS)}, scenes: "
        f"{_format_weights(SCENES['question_weights'])})",
    )
    parser.add_argument(
        "--mask-sampling",
        choices=MASK_SAMPLING,
        default="count",
        help="count: MaskCountSampling (default); time: t ~ U(0, 1) per sample",
    )
    parser.add_argument(
        "--no-curriculum",
        action="store_true",
        help="stop after Stage 2 (the scenes task otherwise runs SCENES_CURRICULUM's stages after it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rates = {group: getattr(args, f"{group}_lr") for group in STAGE2_LEARNING_RATES}
    summary = train_demo(
        args.output_dir,
        args.seed,
        args.train_samples,
        args.stage1_steps,
        args.stage2_steps,
        args.batch_size,
        learning_rates=rates,
        device=args.device,
        dataloader_workers=args.dataloader_workers,
        vision_pretrain_steps=args.vision_pretrain_steps,
        description_every=args.description_every,
        description_order=args.description_order,
        mask_sampling=args.mask_sampling,
        question_weights=args.question_weights,
        task=args.task,
        curriculum=() if args.no_curriculum else None,
    )
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k != "losses"}
            | {
                "first_loss": {k: v[0] for k, v in summary["losses"].items()},
                "last_loss": {k: v[-1] for k, v in summary["losses"].items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
