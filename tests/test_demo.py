"""The embedded demo: the synthetic task, its tokenizer/config, a shortened training run, the shipped model."""

import random

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
    shape, color, order = patch_targets(coverage, [square])
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
    _, _, order = patch_targets(coverage, [right, left])
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
