"""The scenes task: the synthetic task of the shipped demo model, with one-word questions and long answers.

Scenes are drawn with PIL: one to five solid shapes side by side (circle, square, triangle; red, green, blue,
yellow; small or big; kinds and colours may repeat) on a mid-tone background, in a strip of five slots filled from
the left, one anyres tile per slot. The one-word questions are those of `llada_v.demo.task`, asked only where they have
one right answer (`can_ask`: "What color is the circle?" needs exactly one circle):

| type | example | answer |
|---|---|---|
| color | What color is the circle? | red |
| shape | Which shape is blue? | square |
| count | How many shapes are there? | four |
| exists | Is there a triangle? | yes / no |
| leftmost | Which shape is on the left? | circle |

Scene *descriptions* (`describe`) name every object as "size colour shape", in one canonical string per scene:
"Which shapes are there?" -> "big red circle left of small blue square" (from left to right) and, in training
only, "Which colors are there?" -> "small blue square and big red circle" (by colour name). They are the long
answers (3-23 words) and the demo's counterpart of the caption data LLaVA-style models are aligned with.
Training may also draw question types with weights (`make_sample`); held-out sets draw them uniformly.

The module has the interface of `llada_v.demo.task` (the one-to-three-shape task of the earlier model), so that
training, evaluation and the demo take either (`llada_v.demo.train --task scenes`). Everything is a pure
function of a seed (`random.Random`), so a held-out set is reproducible and disjoint from training by
construction (training uses seeds from a different range).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .task import (
    QUESTION_TYPES,
    Scene,
    SceneObject,
    _weighted_kinds,
    check_question_weights,
    draw_object,
    normalise_answer,
)

NAME = "scenes"

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SIZES = ("small", "big")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
# Mid-tone backgrounds: pixels near 0 after SigLIP normalisation, so shapes dominate the patch features.
BACKGROUNDS = ((128, 128, 128), (110, 115, 120), (145, 140, 135))

MAX_OBJECTS = 5
# Every scene is a strip of MAX_OBJECTS slots of SLOT x SLOT px, the demo model's crop
# (`llada_v.demo.model.DEMO_CROP`), so anyres tiling cuts it 1x5 into one tile per slot. The objects fill the
# slots from the left (empty slots are background): the k-th object from the left is always in the k-th tile, at
# the same place in the model's input whatever the number of objects. A shape's side is a fraction of the slot:
# big 0.75-0.9, small 0.4-0.5, so a big shape is always larger in pixels than a small one (>= 42 px against
# <= 28 px): size is absolute, not relative.
SLOT = 56
SIZE_FRACTIONS = {"small": (0.4, 0.5), "big": (0.75, 0.9)}


def draw_scene(rng: random.Random) -> Scene:
    """A new scene: 1-5 shapes side by side in the strip's slots from the left (so "left" is well defined), each
    with a random kind, colour and size (kinds and colours may repeat: five shapes cannot all differ with three
    kinds) and a random place in its slot."""
    count = rng.randint(1, MAX_OBJECTS)
    image = Image.new("RGB", (SLOT * MAX_OBJECTS, SLOT), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    objects = []
    for slot in range(count):
        shape, color, size = rng.choice(SHAPES), rng.choice(sorted(COLORS)), rng.choice(SIZES)
        side = int(SLOT * rng.uniform(*SIZE_FRACTIONS[size]))
        left = slot * SLOT + rng.randint(0, SLOT - 1 - side)
        top = rng.randint(0, SLOT - 1 - side)
        box = (left, top, left + side, top + side)
        draw_object(draw, shape, box, COLORS[color])
        objects.append(SceneObject(shape, color, box, size))
    return Scene(image, objects)


def _unique(objects: list[SceneObject], attribute: str) -> list[SceneObject]:
    """The objects whose `attribute` (shape or color) no other object of the scene shares."""
    values = [getattr(o, attribute) for o in objects]
    return [o for o in objects if values.count(getattr(o, attribute)) == 1]


def can_ask(scene: Scene, kind: str) -> bool:
    """Whether a question of type `kind` has one right answer: "What color is the circle?" needs exactly one
    circle, "Which shape is blue?" exactly one blue shape."""
    if kind == "color":
        return bool(_unique(scene.objects, "shape"))
    if kind == "shape":
        return bool(_unique(scene.objects, "color"))
    if kind in QUESTION_TYPES:
        return True
    raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """One question of type `kind` about the scene and its one-word answer (`can_ask` must hold)."""
    objects = scene.objects
    if not can_ask(scene, kind):
        raise ValueError(f"a {kind!r} question has no single answer in this scene")
    if kind == "color":
        obj = rng.choice(_unique(objects, "shape"))
        return f"What color is the {obj.shape}?", obj.color
    if kind == "shape":
        obj = rng.choice(_unique(objects, "color"))
        return f"Which shape is {obj.color}?", obj.shape
    if kind == "count":
        return "How many shapes are there?", NUMBER_WORDS[len(objects)]
    if kind == "exists":
        shape = rng.choice(SHAPES)
        return f"Is there a {shape}?", "yes" if any(o.shape == shape for o in objects) else "no"
    return "Which shape is on the left?", min(objects, key=lambda o: o.center_x).shape


def draw_scene_for(rng: random.Random, kind: str, min_objects: int = 1) -> Scene:
    """A scene of at least `min_objects` shapes where a `kind` question has one right answer (scenes are drawn
    until one fits)."""
    if not 1 <= min_objects <= MAX_OBJECTS:
        raise ValueError(f"min_objects must be 1..{MAX_OBJECTS}, got {min_objects}")
    while True:
        scene = draw_scene(rng)
        if len(scene.objects) >= min_objects and can_ask(scene, kind):
            return scene


# The description question of each order: the question tells the model which order to answer in.
DESCRIBE_QUESTIONS = {"left": "Which shapes are there?", "color": "Which colors are there?"}
DESCRIPTION_ORDERS = tuple(DESCRIBE_QUESTIONS)
# Between two objects of a description from the left: where the first one is. By colour name: "and".
JOINERS = {"left": " left of ", "color": " and "}


def describe(scene: Scene, order: str = "left") -> tuple[str, str]:
    """The description question and its one canonical answer: every object as "size colour shape".

    `order="left"` ("Which shapes are there?"): from left to right, joined by "left of" ("big red circle left of
    small blue square"), 5n - 2 words for n objects. `"color"` ("Which colors are there?"): by colour name, ties
    from the left, joined by "and" (the shape after each colour can then only be found by looking for that colour
    in the image, not by counting objects from the left).
    """
    if order not in DESCRIPTION_ORDERS:
        raise ValueError(f"order must be one of {DESCRIPTION_ORDERS}, got {order!r}")
    by_left = sorted(scene.objects, key=lambda o: o.center_x)
    ordered = by_left if order == "left" else sorted(by_left, key=lambda o: o.color)  # stable: ties from the left
    answer = JOINERS[order].join(f"{o.size} {o.color} {o.shape}" for o in ordered)
    return DESCRIBE_QUESTIONS[order], answer


def make_sample(seed: int | str, turns: int = 1, weights: dict[str, float] | None = None) -> dict:
    """A sample: the scene image and `turns` question/answer pairs of distinct types.

    Types are drawn uniformly (the held-out sets), or with `weights` (type -> relative weight, 1 where not
    given; training data can ask the hard types more often).
    """
    if turns < 1:
        raise ValueError(f"turns must be at least 1, got {turns}")
    rng = random.Random(seed)
    count = min(turns, len(QUESTION_TYPES))
    kinds = rng.sample(QUESTION_TYPES, count) if weights is None else _weighted_kinds(rng, count, weights)
    while True:  # a scene where every drawn type has one right answer
        scene = draw_scene(rng)
        if all(can_ask(scene, kind) for kind in kinds):
            break
    qa = [ask(scene, kind, rng) for kind in kinds]
    return {"image": scene.image, "qa": qa, "types": kinds, "objects": scene.objects}


def vocabulary() -> list[str]:
    """Every word the task can produce, for the demo's small word-level tokenizer."""
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(NUMBER_WORDS) | {"yes", "no"}
    for joiner in JOINERS.values():
        words.update(joiner.split())
    for question in DESCRIBE_QUESTIONS.values():
        words.update(question.replace("?", " ?").split())
    for scene_kind in QUESTION_TYPES:
        rng = random.Random(0)
        for _ in range(50):
            question, _ = ask(draw_scene_for(rng, scene_kind), scene_kind, rng)
            words.update(question.replace("?", " ?").split())
    return sorted(words)


__all__ = [
    "COLORS",
    "DESCRIBE_QUESTIONS",
    "DESCRIPTION_ORDERS",
    "MAX_OBJECTS",
    "NAME",
    "NUMBER_WORDS",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "ask",
    "can_ask",
    "check_question_weights",
    "describe",
    "draw_object",
    "draw_scene",
    "draw_scene_for",
    "make_sample",
    "normalise_answer",
    "vocabulary",
]
