"""The synthetic visual question answering task of the earlier demo model (`--task shapes`; the shipped model's
is `llada_v.demo.scenes`).

Scenes are drawn with PIL: one to three solid shapes (circle, square, triangle; each kind at most once,
each colour at most once) on a light background, in images of varied sizes and aspect ratios so that
anyres tiling matters. Questions have one-word answers:

| type | example | answer |
|---|---|---|
| color | What color is the circle? | red |
| shape | Which shape is blue? | square |
| count | How many shapes are there? | two |
| exists | Is there a triangle? | yes / no |
| leftmost | Which shape is on the left? | circle |

Training data also holds scene *descriptions* (`describe`: "Which shapes are there?" -> "red circle blue
square" from left to right, "Which colors are there?" -> "blue square red circle" by colour name), the demo's
counterpart of the caption data LLaVA-style models are aligned with. They are not a question type of the
held-out set. Training may also draw question types with weights (`make_sample`); held-out sets draw them
uniformly.

Everything is a pure function of a seed (`random.Random`), so a held-out set is reproducible and
disjoint from training by construction (training uses seeds from a different range).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

NAME = "shapes"  # `llada_v.demo.tasks.get_task` finds this module (and `llada_v.demo.scenes`) by name
MAX_OBJECTS = 3
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
NUMBER_WORDS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "shape", "count", "exists", "leftmost")
# Mid-tone backgrounds: pixels near 0 after SigLIP normalisation, so shapes dominate the patch features.
BACKGROUNDS = ((128, 128, 128), (110, 115, 120), (145, 140, 135))

# Image sides in pixels: wide, tall and square scenes.
MIN_SIDE, MAX_SIDE = 56, 200
MIN_SLOT = 45  # horizontal room per shape


@dataclass
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # left, top, right, bottom
    size: str | None = None  # "small" / "big" in the scenes task (`demo.scenes`); None here

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject] = field(default_factory=list)


def draw_scene(rng: random.Random) -> Scene:
    """A new scene: 1-3 shapes of distinct kinds and colours, side by side (so "left" is well defined)."""
    count = rng.randint(1, 3)
    # Wide, tall and square canvases; wide enough that every shape keeps >= ~25 px.
    width = rng.randint(max(MIN_SIDE, MIN_SLOT * count), MAX_SIDE)
    height = rng.randint(MIN_SIDE, MAX_SIDE)
    image = Image.new("RGB", (width, height), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    shapes = rng.sample(SHAPES, count)
    colors = rng.sample(sorted(COLORS), count)
    slot_w = width / count
    objects = []
    for slot, (shape, color) in enumerate(zip(shapes, colors)):
        size = int(min(slot_w, height) * rng.uniform(0.55, 0.85))
        left = int(slot * slot_w + rng.uniform(0, slot_w - size))
        top = rng.randint(0, height - size)
        box = (left, top, left + size, top + size)
        draw_object(draw, shape, box, COLORS[color])
        objects.append(SceneObject(shape, color, box))
    return Scene(image, objects)


def draw_object(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    """Draw one solid shape filling the square `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def can_ask(scene: Scene, kind: str) -> bool:
    """Whether a question of type `kind` has one right answer (always, in this task: kinds and colours are
    distinct)."""
    if kind not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")
    return True


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One question of type `kind` about the scene and its one-word answer."""
    objects = scene.objects
    if kind == "color":
        obj = rng.choice(objects)
        return f"What color is the {obj.shape}?", obj.color
    if kind == "shape":
        obj = rng.choice(objects)
        return f"Which shape is {obj.color}?", obj.shape
    if kind == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(objects)]
    if kind == "exists":
        shape = rng.choice(SHAPES)
        return f"Is there a {shape}?", "yes" if any(o.shape == shape for o in objects) else "no"
    if kind == "leftmost":
        return "Which shape is on the left?", min(objects, key=lambda o: o.center_x).shape
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


# The description question of each order: the question tells the model which order to answer in.
DESCRIBE_QUESTIONS = {"left": "Which shapes are there?", "color": "Which colors are there?"}
DESCRIPTION_ORDERS = tuple(DESCRIBE_QUESTIONS)


def describe(scene: Scene, order: str = "left") -> tuple[str, str]:
    """The description question and its answer: every object as "colour shape", from left to right
    (`order="left"`, "Which shapes are there?") or by colour name (`"color"`, "Which colors are there?": the
    shape after each colour can then only be found by looking for that colour in the image, not by counting
    objects from the left)."""
    if order not in DESCRIPTION_ORDERS:
        raise ValueError(f"order must be one of {DESCRIPTION_ORDERS}, got {order!r}")
    key = (lambda o: o.center_x) if order == "left" else (lambda o: o.color)
    answer = " ".join(f"{o.color} {o.shape}" for o in sorted(scene.objects, key=key))
    return DESCRIBE_QUESTIONS[order], answer


def check_question_weights(weights: dict[str, float], turns: int = 1) -> None:
    """Raise if `weights` (type -> relative weight, 1 where not given) cannot draw `turns` distinct types."""
    if not isinstance(weights, dict):
        raise TypeError(f"question weights must be a dict of type -> weight, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(QUESTION_TYPES))
    if unknown:
        raise ValueError(f"unknown question types in weights: {unknown}; expected some of {QUESTION_TYPES}")
    not_numbers = {kind: w for kind, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))}
    if not_numbers:
        raise TypeError(f"question weights must be numbers, got {not_numbers}")
    bad = {kind: w for kind, w in weights.items() if not w >= 0}
    if bad:
        raise ValueError(f"question weights must be >= 0, got {bad}")
    pool = [kind for kind in QUESTION_TYPES if weights.get(kind, 1.0) > 0]
    if len(pool) < min(turns, len(QUESTION_TYPES)):
        raise ValueError(f"{turns} distinct question types need {turns} with positive weight, got {pool}")


def _weighted_kinds(rng: random.Random, count: int, weights: dict[str, float]) -> list[str]:
    """`count` distinct question types drawn one after another with probabilities proportional to `weights`."""
    check_question_weights(weights, count)
    pool = [kind for kind in QUESTION_TYPES if weights.get(kind, 1.0) > 0]
    kinds = []
    for _ in range(count):
        kind = rng.choices(pool, weights=[weights.get(k, 1.0) for k in pool])[0]
        pool.remove(kind)
        kinds.append(kind)
    return kinds


def make_sample(seed: int | str, turns: int = 1, weights: dict[str, float] | None = None) -> dict:
    """A sample: the scene image and `turns` question/answer pairs of distinct types.

    Types are drawn uniformly (the held-out sets), or with `weights` (type -> relative weight, 1 where not
    given; training data can ask the hard types more often).
    """
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    rng = random.Random(seed)
    scene = draw_scene(rng)
    count = min(turns, len(QUESTION_TYPES))
    kinds = rng.sample(QUESTION_TYPES, count) if weights is None else _weighted_kinds(rng, count, weights)
    qa = [ask(scene, kind, rng) for kind in kinds]
    return {"image": scene.image, "qa": qa, "types": kinds, "objects": scene.objects}


def vocabulary() -> list[str]:
    """Every word the task can produce, for the demo's small word-level tokenizer."""
    words = set(SHAPES) | set(COLORS) | set(NUMBER_WORDS) | {"yes", "no"}
    for question in DESCRIBE_QUESTIONS.values():
        words.update(question.replace("?", " ?").split())
    for scene_kind in QUESTION_TYPES:
        rng = random.Random(0)
        for _ in range(50):
            question, _ = ask(draw_scene(rng), scene_kind, rng)
            words.update(question.replace("?", " ?").split())
    return sorted(words)


def normalise_answer(text: str) -> str:
    return text.strip().strip(".").lower()
