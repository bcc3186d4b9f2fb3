"""The embedded demo: the synthetic task, its tokenizer/config, a shortened training run, the shipped model."""

import json
import random
import re

import pytest
import torch
from PIL import Image

from llada_v.demo.model import build_demo_processor, build_demo_tokenizer, demo_config
from llada_v.demo.task import (
    COLORS,
    DESCRIBE_QUESTIONS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    SHAPES,
    ask,
    describe,
    draw_scene,
    make_sample,
)

# ---------------------------------------------------------------- task


def test_samples_are_deterministic_and_answers_match_the_scene():
    for seed in range(50):
        a, b = make_sample(seed, turns=2), make_sample(seed, turns=2)
        assert a["qa"] == b["qa"] and a["image"].tobytes() == b["image"].tobytes()
        objects = a["objects"]
        assert 1 <= len(objects) <= 3
        assert len({o.shape for o in objects}) == len(objects) and len({o.color for o in objects}) == len(objects)
        for (question, answer), kind in zip(a["qa"], a["types"]):
            if kind == "count":
                assert answer == NUMBER_WORDS[len(objects)]
            elif kind == "color":
                shape = question.split()[-1].rstrip("?")
                assert answer == next(o.color for o in objects if o.shape == shape)
            elif kind == "leftmost":
                assert answer == min(objects, key=lambda o: o.box[0]).shape


def test_rendered_colours_are_where_the_objects_are():
    scene = draw_scene(random.Random(7))
    for obj in scene.objects:
        cx, cy = (obj.box[0] + obj.box[2]) // 2, (obj.box[1] + obj.box[3]) // 2 + (obj.box[3] - obj.box[1]) // 4
        assert scene.image.getpixel((cx, cy)) == COLORS[obj.color]


def test_every_question_type_and_answer_occurs():
    rng = random.Random(0)
    seen = {kind: set() for kind in QUESTION_TYPES}
    for _ in range(300):
        scene = draw_scene(rng)
        for kind in QUESTION_TYPES:
            seen[kind].add(ask(scene, kind, rng)[1])
    assert seen["color"] == set(COLORS) and seen["shape"] == set(SHAPES) == seen["leftmost"]
    assert seen["count"] == {"one", "two", "three"} and seen["exists"] == {"yes", "no"}
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        ask(scene, "size", rng)


def test_descriptions_name_every_object_with_its_colour_from_left_to_right_or_by_colour():
    rng = random.Random(5)
    for _ in range(30):
        scene = draw_scene(rng)
        question, answer = describe(scene)
        assert question == "Which shapes are there?"
        words = answer.split()
        pairs = list(zip(words[0::2], words[1::2]))
        assert len(words) == 2 * len(scene.objects)
        assert sorted(pairs) == sorted((o.color, o.shape) for o in scene.objects)
        lefts = [next(o.box[0] for o in scene.objects if o.shape == shape) for _, shape in pairs]
        assert lefts == sorted(lefts)
        question, by_color = describe(scene, order="color")
        assert question == "Which colors are there?"
        by_color = by_color.split()
        assert sorted(zip(by_color[0::2], by_color[1::2])) == sorted(pairs)
        assert by_color[0::2] == sorted(by_color[0::2])
    with pytest.raises(ValueError, match="order must be one of"):
        describe(scene, order="size")


def test_weighted_question_types_follow_the_weights_and_stay_distinct():
    counts = dict.fromkeys(QUESTION_TYPES, 0)
    for seed in range(1400):
        sample = make_sample(seed, weights={"shape": 3.0, "count": 0.0})
        counts[sample["types"][0]] += 1
    # Expected shares: shape 3/6, color / exists / leftmost 1/6 each, count never.
    assert counts["count"] == 0
    assert abs(counts["shape"] / 1400 - 0.5) < 0.05, counts
    for kind in ("color", "exists", "leftmost"):
        assert abs(counts[kind] / 1400 - 1 / 6) < 0.04, counts
    for seed in range(50):
        types = make_sample(seed, turns=4, weights={"shape": 3.0, "count": 0.0})["types"]
        assert len(set(types)) == 4 and "count" not in types
    # Without weights the draw is the uniform one of the held-out sets.
    assert make_sample(3)["qa"] == make_sample(3, weights=None)["qa"]
    with pytest.raises(ValueError, match=r"unknown question types in weights: \['size'\]"):
        make_sample(0, weights={"size": 1.0})
    with pytest.raises(ValueError, match=r"question weights must be >= 0, got \{'shape': -1.0\}"):
        make_sample(0, weights={"shape": -1.0})
    with pytest.raises(ValueError, match="2 distinct question types need 2 with positive weight"):
        make_sample(0, turns=2, weights=dict.fromkeys(QUESTION_TYPES[1:], 0.0))
    with pytest.raises(TypeError, match=r"question weights must be numbers, got \{'shape': '3'\}"):
        make_sample(0, weights={"shape": "3"})


def test_held_out_scenes_use_their_own_seed_stream():
    from llada_v.demo.app import held_out_sample

    a = held_out_sample(3, 0)
    assert a["image"].tobytes() != held_out_sample(4, 0)["image"].tobytes()
    assert a["image"].tobytes() == held_out_sample(3, 0)["image"].tobytes()


# ---------------------------------------------------------------- tokenizer / config


def test_demo_tokenizer_and_config_agree():
    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer)
    assert config.text_config.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id == len(tokenizer) - 1
    assert config.tokenizer_vocab_size == len(tokenizer) - 2  # <video> and <image> are never generated
    assert tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == config.mask_token_id
    processor = build_demo_processor(config, tokenizer)
    sample = make_sample(1)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["qa"][0][0]}]}],
        add_generation_prompt=True,
        system_prompt="",
    )
    inputs = processor(images=[[sample["image"]]], text=[text])
    words = tokenizer.decode(
        [i for i in inputs["input_ids"][0].tolist() if i != config.image_token_id], skip_special_tokens=True
    )
    assert words.replace("?", " ?").split() == ["user", *sample["qa"][0][0].replace("?", " ?").split(), "assistant"]
    assert tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()


def test_words_the_demo_tokenizer_does_not_know_are_named_in_a_warning():
    import logging

    tokenizer = build_demo_tokenizer()
    processor = build_demo_processor(demo_config(tokenizer), tokenizer)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("llada_v.processing_llada_v")
    logger.addHandler(handler)
    try:
        processor(text=["What color is the zyxwv ?", "What color is the circle ?"])
        processor(text=["What color is the circle ?"])  # known words only: no warning
        processor(text=["What color is the zyxwv ?"])  # the same unknown word again: warned once
    finally:
        logger.removeHandler(handler)
    messages = [record.getMessage() for record in records]
    assert messages == [
        "the prompt has words the tokenizer does not know, read as [UNK]: zyxwv (the model sees no meaning in them)"
    ]


# ---------------------------------------------------------------- training


def test_training_data_mixes_descriptions_and_answer_labels_fill_the_canvas(tmp_path):
    from llada_v.demo.train import DEMO_GENERATION, DESCRIPTION_EVERY, AnswerOnlyLabels, write_training_data
    from llada_v.training.data import IGNORE_INDEX, LladaVDataset, TemplateTokens

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer)
    processor = build_demo_processor(config, tokenizer)
    data = write_training_data(tmp_path, 12, seed=0)
    records = __import__("json").loads(data.read_text())
    questions = [r["conversations"][0]["value"].split("\n")[1] for r in records]
    described = [i for i in range(12) if i % DESCRIPTION_EVERY == DESCRIPTION_EVERY - 1]
    assert [q in DESCRIBE_QUESTIONS.values() for q in questions] == [i in described for i in range(12)]
    # The default alternates the two orders, each asked with its own question.
    assert [questions[i] for i in described] == [DESCRIBE_QUESTIONS[o] for o in ("left", "color", "left", "color")]
    assert any(len(r["conversations"]) == 4 for r in records)  # two-turn samples remain
    canvas = DEMO_GENERATION["max_new_tokens"]
    dataset = AnswerOnlyLabels(
        LladaVDataset(data, processor, image_folder=tmp_path, system_prompt=None),
        TemplateTokens.from_processor(processor),
        eos_token_id=config.eos_token_id,
        canvas=canvas,
    )
    eos, eot = config.eos_token_id, config.eot_token_id
    for record, item in zip(records, dataset):
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        expected = []
        for answer in answers:
            expected += [*tokenizer.convert_tokens_to_ids(answer.split()), eot]
        tail = max(0, canvas - (len(answers[-1].split()) + 1))
        expected += [eos] * tail
        assert [label for label in labels if label != IGNORE_INDEX] == expected
        assert ids[-len(answers[-1].split()) - 1 - tail :] == expected[-len(answers[-1].split()) - 1 - tail :]
    with pytest.raises(ValueError, match="description_every"):
        write_training_data(tmp_path / "bad", 2, seed=0, description_every=-1)
    with pytest.raises(ValueError, match="description_order"):
        write_training_data(tmp_path / "bad", 2, seed=0, description_order="size")
    with pytest.raises(ValueError, match="unknown question types"):
        write_training_data(tmp_path / "bad", 2, seed=0, question_weights={"size": 2.0})
    with pytest.raises(ValueError, match="2 distinct question types need 2"):  # two-turn samples need two types
        write_training_data(tmp_path / "bad", 2, seed=0, question_weights=dict.fromkeys(QUESTION_TYPES[1:], 0.0))
    assert not (tmp_path / "bad").exists()  # rejected before anything is written
    with pytest.raises(ValueError, match="canvas"):
        AnswerOnlyLabels(dataset.dataset, dataset.tokens, eos_token_id=eos, canvas=0)


@pytest.mark.slow
def test_shortened_training_drives_the_loss_well_below_its_start(tmp_path):
    from llada_v.demo.train import train_demo

    # Stage 0 has its own test below; here the Trainer stages alone, from a random tower.
    summary = train_demo(
        tmp_path / "demo",
        seed=0,
        train_samples=512,
        stage1_steps=5,
        stage2_steps=160,
        batch_size=8,
        work_dir=tmp_path / "work",
        vision_pretrain_steps=0,
    )
    assert "stage0" not in summary["losses"]
    stage2 = summary["losses"]["stage2"]
    assert len(stage2) >= 10
    start, end = sum(stage2[:2]) / 2, sum(stage2[-3:]) / 3
    assert end < 0.7 * start, stage2  # answer-only labels: the early loss is the answer priors
    assert (tmp_path / "demo" / "config.json").is_file() and (tmp_path / "demo" / "processor_config.json").is_file()


def test_object_coverage_follows_the_image_processor_crops():
    from llada_v.demo.train import object_coverage, patch_targets

    tokenizer = build_demo_tokenizer()
    processor = build_demo_processor(demo_config(tokenizer), tokenizer)
    # A 56x56 image is one tile plus the base crop, both the image itself; PIL's rectangle includes its right
    # and bottom edges, so pixels 14..41 are exactly patches 1 and 2 of the 4x4 grid (14 px each).
    square = {"shape": "square", "color": "blue", "box": [14, 14, 41, 41]}
    coverage = object_coverage((56, 56), [square], processor)
    assert coverage.shape == (2, 16, 1)
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 1.0
    for crop in coverage:
        torch.testing.assert_close(crop[:, 0].view(4, 4), expected, atol=0.02, rtol=0)
    shape, color, order, _ = patch_targets(coverage, [square])
    inside, outside = 5, 0  # patch (1, 1) and patch (0, 0)
    assert shape[0, inside].argmax().item() == 1 + SHAPES.index("square")
    assert color[0, inside].argmax().item() == 1 + sorted(COLORS).index("blue")
    assert order[0, inside].argmax().item() == 1  # first from the left
    assert (
        shape[0, outside].argmax().item() == color[0, outside].argmax().item() == order[0, outside].argmax().item() == 0
    )
    for target in (shape, color, order):
        torch.testing.assert_close(target.sum(-1), torch.ones(2, 16))

    # A wide two-object scene: padding rows are background, the objects keep their left-to-right order.
    left = {"shape": "circle", "color": "red", "box": [0, 0, 50, 50]}
    right = {"shape": "triangle", "color": "green", "box": [60, 0, 110, 50]}
    coverage = object_coverage((112, 56), [right, left], processor)
    _, _, order, _ = patch_targets(coverage, [right, left])
    base = order[0].view(4, 4, -1).argmax(-1)
    assert base[2, 0].item() == 1 and base[2, 3].item() == 2, base  # the base crop squashes 112x56 to 56x56
    pixels = processor.image_processor(Image.new("RGB", (112, 56)), return_tensors="pt")["pixel_values"]
    assert coverage.shape[0] == pixels.shape[0]


@pytest.mark.slow
def test_stage0_trains_only_the_vision_tower_and_learns_the_patch_labels(tmp_path):
    from llada_v import LladaVModel
    from llada_v.demo.train import pretrain_vision, write_training_data

    tokenizer = build_demo_tokenizer()
    config = demo_config(tokenizer)
    processor = build_demo_processor(config, tokenizer)
    torch.manual_seed(0)
    model = LladaVModel(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = write_training_data(tmp_path, 256, seed=0)
    losses = pretrain_vision(model, data, processor, steps=100, batch_size=16, learning_rate=1e-3, seed=0)
    assert len(losses) == 20 and losses[-1] < 0.6 * losses[0], losses
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("vision_tower.") for name in changed)
    assert not any("post_layernorm" in name for name in changed)


@pytest.mark.slow
def test_train_demo_runs_stage0_first(tmp_path):
    from llada_v.demo.train import train_demo

    summary = train_demo(
        tmp_path / "demo",
        seed=0,
        train_samples=32,
        stage1_steps=0,
        stage2_steps=1,
        batch_size=2,
        work_dir=tmp_path / "work",
        vision_pretrain_steps=20,
    )
    assert list(summary["losses"]) == ["stage0", "stage2"] and len(summary["losses"]["stage0"]) == 20
    with pytest.raises(ValueError, match="vision_pretrain_steps"):
        train_demo(tmp_path / "bad", vision_pretrain_steps=-1)


def test_question_weights_option_parses_pairs_and_names_bad_input():
    import argparse

    from llada_v.demo.train import _question_weights

    assert _question_weights("shape=3, color=0.5") == {"shape": 3.0, "color": 0.5}
    assert _question_weights("uniform") == {}
    for text, message in (
        ("size=2", "got 'size=2'"),
        ("shape", "got 'shape'"),
        ("shape=x", "must be a number, got 'x'"),
        ("shape=-1", "must be >= 0, got '-1'"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            _question_weights(text)


# ---------------------------------------------------------------- the scenes task (`--task scenes`)


def test_scenes_samples_are_deterministic_and_answers_match_the_scene():
    from llada_v.demo import scenes

    for seed in range(80):
        a, b = scenes.make_sample(seed, turns=2), scenes.make_sample(seed, turns=2)
        assert a["qa"] == b["qa"] and a["image"].tobytes() == b["image"].tobytes()
        objects = a["objects"]
        assert 1 <= len(objects) <= scenes.MAX_OBJECTS == 5
        for (question, answer), kind in zip(a["qa"], a["types"]):
            if kind == "count":
                assert answer == scenes.NUMBER_WORDS[len(objects)]
            elif kind == "color":  # asked only about a shape the scene holds once
                shape = question.split()[-1].rstrip("?")
                [match] = [o for o in objects if o.shape == shape]
                assert answer == match.color
            elif kind == "shape":  # asked only about a colour the scene holds once
                color = question.split()[-1].rstrip("?")
                [match] = [o for o in objects if o.color == color]
                assert answer == match.shape
            elif kind == "leftmost":
                assert answer == min(objects, key=lambda o: o.box[0]).shape


def test_scenes_shapes_sit_side_by_side_and_big_ones_are_bigger_than_small_ones_in_any_scene():
    from llada_v.demo import scenes

    rng = random.Random(1)
    big, small = [], []
    for _ in range(300):
        scene = scenes.draw_scene(rng)
        boxes = sorted(o.box for o in scene.objects)
        assert all(a[2] <= b[0] for a, b in zip(boxes, boxes[1:]))  # no overlap: "left of" is well defined
        assert all(0 <= o.box[0] and o.box[2] <= scene.image.width and o.box[3] <= scene.image.height
                   for o in scene.objects)  # fmt: skip
        for o in scene.objects:
            (big if o.size == "big" else small).append(o.box[2] - o.box[0])
        for obj in scene.objects:
            cx, cy = (obj.box[0] + obj.box[2]) // 2, (obj.box[1] + obj.box[3]) // 2 + (obj.box[3] - obj.box[1]) // 4
            assert scene.image.getpixel((cx, cy)) == scenes.COLORS[obj.color]
    assert min(big) > max(small)
    assert {len(scenes.draw_scene(random.Random(i)).objects) for i in range(100)} == set(range(1, 6))


def test_scenes_are_five_tile_strips_with_the_kth_object_inside_the_kth_tile():
    from llada_v.demo import scenes

    tokenizer = build_demo_tokenizer("scenes")
    processor = build_demo_processor(demo_config(tokenizer, "scenes"), tokenizer)
    rng = random.Random(2)
    for _ in range(200):
        scene = scenes.draw_scene(rng)
        assert scene.image.size == (280, 56)
        for k, obj in enumerate(scene.objects):  # filled from the left, one slot each
            assert 56 * k <= obj.box[0] and obj.box[2] < 56 * (k + 1) and 0 <= obj.box[1] and obj.box[3] < 56
        for x in range(56 * len(scene.objects), 280, 7):  # the slots after the last object are background
            assert len({scene.image.getpixel((x, y)) for y in range(0, 56, 7)}) == 1
    crops = processor.image_processor(scene.image, return_tensors="pt")
    assert crops["pixel_values"].shape[0] == 6 and crops["num_image_tokens"] == [100]  # the base crop + 1x5 tiles


def test_scenes_every_question_type_and_answer_occurs_and_ambiguous_questions_are_not_asked():
    from llada_v.demo import scenes

    rng = random.Random(0)
    seen = {kind: set() for kind in QUESTION_TYPES}
    for _ in range(300):
        scene = scenes.draw_scene(rng)
        for kind in QUESTION_TYPES:
            if scenes.can_ask(scene, kind):
                seen[kind].add(scenes.ask(scene, kind, rng)[1])
    assert seen["color"] == set(COLORS) and seen["shape"] == set(SHAPES) == seen["leftmost"]
    assert seen["count"] == {"one", "two", "three", "four", "five"} and seen["exists"] == {"yes", "no"}
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        scenes.ask(scene, "size", rng)
    two_circles = scenes.Scene(scene.image, [scenes.SceneObject("circle", "red", (0, 0, 9, 9)),
                                             scenes.SceneObject("circle", "red", (10, 0, 19, 9))])  # fmt: skip
    assert not scenes.can_ask(two_circles, "color") and not scenes.can_ask(two_circles, "shape")
    with pytest.raises(ValueError, match="a 'color' question has no single answer in this scene"):
        scenes.ask(two_circles, "color", rng)


def test_scenes_descriptions_are_canonical_size_colour_shape_from_left_to_right_or_by_colour():
    from llada_v.demo import scenes

    rng = random.Random(5)
    for _ in range(40):
        scene = scenes.draw_scene(rng)
        question, answer = scenes.describe(scene)
        assert question == "Which shapes are there?"
        by_left = sorted(scene.objects, key=lambda o: o.box[0])
        assert answer == " left of ".join(f"{o.size} {o.color} {o.shape}" for o in by_left)
        assert len(answer.split()) == 5 * len(scene.objects) - 2
        question, by_color = scenes.describe(scene, order="color")
        assert question == "Which colors are there?"
        triples = [t.split() for t in by_color.split(" and ")]
        assert sorted(map(tuple, triples)) == sorted((o.size, o.color, o.shape) for o in scene.objects)
        assert [t[1] for t in triples] == sorted(t[1] for t in triples)
    pair = [scenes.SceneObject("square", "blue", (30, 0, 40, 10), "small"),
            scenes.SceneObject("circle", "red", (0, 0, 25, 25), "big")]  # fmt: skip
    assert scenes.describe(scenes.Scene(scene.image, pair)) == (
        "Which shapes are there?", "big red circle left of small blue square")  # fmt: skip
    with pytest.raises(ValueError, match="order must be one of"):
        scenes.describe(scene, order="size")


def test_scenes_tokenizer_config_and_held_out_streams():
    from llada_v.demo.app import held_out_description, held_out_sample
    from llada_v.demo.model import task_of
    from llada_v.demo.tasks import get_task

    tokenizer = build_demo_tokenizer("scenes")
    assert len(tokenizer) == 70 and task_of(tokenizer) == "scenes" and task_of(build_demo_tokenizer()) == "shapes"
    for word in ("small", "big", "four", "five", "left", "of", "and"):
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word
    config = demo_config(tokenizer, "scenes")
    assert config.text_config.hidden_size == 192 and config.max_num_tiles == 6
    assert [280, 56] not in demo_config(build_demo_tokenizer()).image_grid_pinpoints
    assert [56, 280] in config.image_grid_pinpoints  # (height, width): a five-shape strip is tiled 1x5
    assert config.tokenizer_vocab_size == len(tokenizer) - 2
    with pytest.raises(ValueError, match="unknown demo task 'x'"):
        get_task("x")
    with pytest.raises(ValueError, match="unknown demo task 'x'"):
        demo_config(tokenizer, "x")
    sample = held_out_sample(3, 0, "scenes")
    assert sample["qa"] == held_out_sample(3, 0, "scenes")["qa"] and sample["qa"] != held_out_sample(3, 0)["qa"]
    described = held_out_description(3, 0, "scenes")
    assert described["truth"] == get_task("scenes").describe(
        get_task("scenes").Scene(described["image"], described["objects"]))[1]  # fmt: skip
    assert described["image"].tobytes() != held_out_description(4, 0, "scenes")["image"].tobytes()


def test_scenes_training_data_and_canvases_drawn_per_sample(tmp_path):
    from llada_v.demo.train import SCENES_CANVAS, TASK_RECIPES, AnswerOnlyLabels, write_training_data
    from llada_v.training.data import IGNORE_INDEX, LladaVDataset, TemplateTokens

    tokenizer = build_demo_tokenizer("scenes")
    config = demo_config(tokenizer, "scenes")
    processor = build_demo_processor(config, tokenizer)
    every = TASK_RECIPES["scenes"]["description_every"]
    data = write_training_data(tmp_path, 8, seed=0, description_every=every, task="scenes")
    records = __import__("json").loads(data.read_text())
    questions = [r["conversations"][0]["value"].split("\n")[1] for r in records]
    assert [q in DESCRIBE_QUESTIONS.values() for q in questions] == [i % 2 == 1 for i in range(8)]
    # One question sample in four is a two-turn conversation (sample 6: the 4th question).
    assert [i for i, r in enumerate(records) if len(r["conversations"]) == 4] == [6]
    assert all("size" in o for r in records for o in r["objects"])
    dataset = AnswerOnlyLabels(
        LladaVDataset(data, processor, image_folder=tmp_path, system_prompt=None),
        TemplateTokens.from_processor(processor),
        eos_token_id=config.eos_token_id,
        canvas=SCENES_CANVAS,
        seed=0,
    )
    # Every sample draws its canvas from 8..64 tokens, the same one each time it is read.
    canvases = [dataset.canvas_of(i) for i in range(2000)]
    assert min(canvases) == 8 and max(canvases) == 64 and canvases == [dataset.canvas_of(i) for i in range(2000)]
    assert 0.3 < sum(c <= 22 for c in canvases) / 2000 < 0.7  # log-uniform: the median is near 8 * 8 ** 0.5
    other = AnswerOnlyLabels(dataset.dataset, dataset.tokens, config.eos_token_id, SCENES_CANVAS, seed=1)
    assert canvases[:20] != [other.canvas_of(i) for i in range(20)]
    eos, eot = config.eos_token_id, config.eot_token_id
    for index, (record, item) in enumerate(zip(records, dataset)):
        labels = [label for label in item["labels"].tolist() if label != IGNORE_INDEX]
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        expected = []
        for answer in answers:
            expected += [*tokenizer.convert_tokens_to_ids(answer.split()), eot]
        expected += [eos] * max(0, dataset.canvas_of(index) - (len(answers[-1].split()) + 1))
        assert labels == expected
        assert item["input_ids"].tolist()[-len(expected) :][-5:] == expected[-5:]
    with pytest.raises(ValueError, match=r"canvas.*got \(9, 8\)"):
        AnswerOnlyLabels(dataset.dataset, dataset.tokens, eos_token_id=eos, canvas=(9, 8))
    fixed = AnswerOnlyLabels(dataset.dataset, dataset.tokens, eos_token_id=eos, canvas=4)
    assert {fixed.canvas_of(i) for i in range(50)} == {4}


def test_scenes_object_coverage_paints_five_objects_three_at_a_time():
    from llada_v.demo.train import object_coverage, patch_targets

    tokenizer = build_demo_tokenizer("scenes")
    processor = build_demo_processor(demo_config(tokenizer, "scenes"), tokenizer)
    # Five squares, each filling its own 56-px tile of a 280x56 image (PIL's rectangle includes its far edges).
    row = [{"shape": "square", "color": "red", "size": "small" if k % 2 else "big", "box": [56 * k, 0, 56 * k + 55, 55]}
           for k in range(5)]  # fmt: skip
    coverage = object_coverage((280, 56), row, processor)
    assert coverage.shape == (6, 16, 5)  # the base crop and five tiles
    for k in range(5):
        torch.testing.assert_close(coverage[1 + k].mean(0), torch.eye(5)[k], atol=0.02, rtol=0)
    shape, color, order, size = patch_targets(coverage, row, max_objects=5)
    assert order.shape[-1] == 6 and size.shape[-1] == 3
    assert order[0].view(4, 4, -1).argmax(-1)[1].tolist() == [1, 2, 4, 5]  # the base crop squashes 280 px into 4
    assert [size[1 + k].argmax(-1).tolist() for k in range(5)] == [[2 - k % 2] * 16 for k in range(5)]
    for target in (shape, color, order, size):
        torch.testing.assert_close(target.sum(-1), torch.ones(6, 16))


def test_scenes_stage0_tile_labels_name_the_object_of_each_tile_and_background_for_empty_tiles():
    from llada_v.demo import scenes
    from llada_v.demo.train import (
        COLOR_CLASSES,
        SHAPE_CLASSES,
        SIZE_CLASSES,
        _object_record,
        object_coverage,
        tile_targets,
    )

    tokenizer = build_demo_tokenizer("scenes")
    processor = build_demo_processor(demo_config(tokenizer, "scenes"), tokenizer)
    objects = [{"shape": "circle", "color": "blue", "size": "big", "box": [4, 6, 50, 52]},
               {"shape": "triangle", "color": "red", "size": "small", "box": [80, 20, 104, 44]},
               {"shape": "square", "color": "yellow", "size": "small", "box": [140, 0, 166, 26]}]  # fmt: skip
    coverage = object_coverage((280, 56), objects, processor)
    shape, color, size = tile_targets(coverage[1:], objects)
    assert [SHAPE_CLASSES[i] for i in shape] == ["circle", "triangle", "square", "background", "background"]
    assert [COLOR_CLASSES[i] for i in color] == ["blue", "red", "yellow", "background", "background"]
    assert [SIZE_CLASSES[i] for i in size] == ["big", "small", "small", "background", "background"]
    # On rendered scenes every object is the label of its own tile.
    rng = random.Random(3)
    for _ in range(3):
        scene = scenes.draw_scene(rng)
        records = [_object_record(o) for o in scene.objects]
        shape, _, size = tile_targets(object_coverage(scene.image.size, records, processor)[1:], records)
        n = len(records)
        assert [SHAPE_CLASSES[i] for i in shape] == [o.shape for o in scene.objects] + ["background"] * (5 - n)
        assert [SIZE_CLASSES[i] for i in size] == [o.size for o in scene.objects] + ["background"] * (5 - n)


@pytest.mark.slow
def test_scenes_training_runs_every_stage_and_saves_the_scenes_model(tmp_path):
    from transformers import AutoTokenizer

    from llada_v.demo.model import task_of
    from llada_v.demo.train import SCENES_GENERATION, train_demo

    curriculum = (dict(questions=("color", "count"), steps=2), dict(mix=2, steps=2, rate=0.2))
    summary = train_demo(tmp_path / "demo", seed=0, train_samples=32, stage1_steps=1, stage2_steps=2,
                         batch_size=2, vision_pretrain_steps=20, task="scenes", curriculum=curriculum)  # fmt: skip
    assert list(summary["losses"]) == ["stage0", "stage1", "stage2", "stage3.1", "stage3.2"]
    assert len(summary["losses"]["stage0"]) == 20 and len(summary["losses"]["stage3.1"]) == 2
    assert task_of(AutoTokenizer.from_pretrained(tmp_path / "demo")) == "scenes"
    saved = __import__("json").loads((tmp_path / "demo" / "generation_config.json").read_text())
    assert {k: saved[k] for k in SCENES_GENERATION} == SCENES_GENERATION
    with pytest.raises(ValueError, match="unknown demo task 'x'"):
        train_demo(tmp_path / "bad", task="x")


def test_question_data_cycles_the_types_and_asks_content_questions_about_two_or_more_shapes(tmp_path):
    from llada_v.demo.train import CONTENT_TYPES, write_question_data

    kinds = ("color", "shape", "exists", "count", "leftmost")
    records = json.loads(write_question_data(tmp_path / "q", 20, seed=0, kinds=kinds).read_text())
    assert len(records) == 20
    for i, record in enumerate(records):
        kind = kinds[i % len(kinds)]
        objects = record["objects"]
        (human, gpt) = record["conversations"]
        question, answer = human["value"].removeprefix("<image>\n"), gpt["value"]
        assert (tmp_path / "q" / record["image"]).is_file()
        if kind in CONTENT_TYPES:
            assert len(objects) >= 2, record
        if kind == "color":  # the one shape of its kind named in the question has the answer's colour
            named = [o for o in objects if question == f"What color is the {o['shape']}?"]
            assert len(named) == 1 and named[0]["color"] == answer, record
        if kind == "shape":
            named = [o for o in objects if question == f"Which shape is {o['color']}?"]
            assert len(named) == 1 and named[0]["shape"] == answer, record
        if kind == "exists":
            shape = question.removeprefix("Is there a ").removesuffix("?")
            assert answer == ("yes" if any(o["shape"] == shape for o in objects) else "no"), record
    with pytest.raises(ValueError, match="kinds must be question types"):
        write_question_data(tmp_path / "bad", 2, seed=0, kinds=("colour",))
    with pytest.raises(ValueError, match="needs the scenes task, got 'shapes'"):
        write_question_data(tmp_path / "bad", 2, seed=0, kinds=("color",), task="shapes")


def test_curriculum_entries_are_checked_before_training(tmp_path):
    from llada_v.demo.train import SCENES_CURRICULUM, TASK_RECIPES, _check_curriculum, train_demo

    _check_curriculum(SCENES_CURRICULUM)
    assert TASK_RECIPES["scenes"]["curriculum"] == SCENES_CURRICULUM and TASK_RECIPES["shapes"]["curriculum"] == ()
    bad = [
        (dict(steps=3), "exactly one of 'questions' and 'mix'"),
        (dict(questions=("color",), mix=2, steps=3), "exactly one of 'questions' and 'mix'"),
        (dict(questions=("colour",), steps=3), "questions from"),
        (dict(questions=(), steps=3), "questions from"),
        (dict(mix=0, steps=3), "mix >= 1"),
        (dict(mix=2, steps=0), "steps >= 1"),
        (dict(mix=2, steps=2, rate=0), "rate > 0"),
        (dict(mix=2, steps=2, lr=1), "no keys beyond"),
    ]
    for entry, message in bad:
        with pytest.raises(ValueError, match=f"curriculum entry 2 .*{re.escape(message)}"):
            _check_curriculum((dict(mix=2, steps=1), entry))
    with pytest.raises(ValueError, match="curriculum entry 1"):  # before any data is written
        train_demo(tmp_path / "out", task="scenes", curriculum=(dict(steps=1),), work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
