"""The synthetic visual question answering task behind the embedded demo model.

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
square", left to right or by colour name), the demo's counterpart of the caption data LLaVA-style models are
aligned with. They are not a question type of the held-out set.

Everything is a pure function of a seed (`random.Random`), so a held-out set is reproducible and
disjoint from training by construction (training uses seeds from a different range).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

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


DESCRIBE_QUESTION = "Which shapes are there?"


DESCRIPTION_ORDERS = ("left", "color")


def describe(scene: Scene, order: str = "left") -> tuple[str, str]:
    """The description question and its answer: every object as "colour shape", from left to right
    (`order="left"`) or by colour name (`"color"`: the shape after each colour can then only be found by looking
    for that colour in the image, not by counting objects from the left)."""
    if order not in DESCRIPTION_ORDERS:
        raise ValueError(f"order must be one of {DESCRIPTION_ORDERS}, got {order!r}")
    key = (lambda o: o.center_x) if order == "left" else (lambda o: o.color)
    return DESCRIBE_QUESTION, " ".join(f"{o.color} {o.shape}" for o in sorted(scene.objects, key=key))


def make_sample(seed: int | str, turns: int = 1) -> dict:
    """A sample: the scene image and `turns` question/answer pairs of distinct types."""
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    rng = random.Random(seed)
    scene = draw_scene(rng)
    kinds = rng.sample(QUESTION_TYPES, min(turns, len(QUESTION_TYPES)))
    qa = [ask(scene, kind, rng) for kind in kinds]
    return {"image": scene.image, "qa": qa, "types": kinds, "objects": scene.objects}


def vocabulary() -> list[str]:
    """Every word the task can produce, for the demo's small word-level tokenizer."""
    words = set(SHAPES) | set(COLORS) | set(NUMBER_WORDS) | {"yes", "no"}
    words.update(DESCRIBE_QUESTION.replace("?", " ?").split())
    for scene_kind in QUESTION_TYPES:
        rng = random.Random(0)
        for _ in range(50):
            question, _ = ask(draw_scene(rng), scene_kind, rng)
            words.update(question.replace("?", " ?").split())
    return sorted(words)


def normalise_answer(text: str) -> str:
    return text.strip().strip(".").lower()
