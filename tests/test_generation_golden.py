"""diffusion_generate against the official LLaDA-V outputs (../shared/golden, `generation` cases): the converted
tiny checkpoint must return exactly the official ids, with the official number of forward passes and the
same position committed at the same step; a batch of four different prompts equals the four single runs."""

import json

import pytest
import torch

from helpers import expand_golden_ids, golden_image_inputs


def _cases(golden_dir):
    return {c["id"]: c for c in json.loads((golden_dir / "cases.json").read_text())["generation"]}


def _settings(case):
    s = case["settings"]
    return dict(
        steps=s["steps"],
        max_new_tokens=s["gen_length"],
        block_length=s["block_length"],
        temperature=s["temperature"],
        remasking=s["remasking"],
        cfg_scale=s["cfg_scale"],
        mask_token_id=s["mask_id"],
        stop_token_ids=s["stop_token_ids"],
        suffix_token_ids=s["suffix_token_ids"],
    )


CASE_IDS = [
    "wide_s8_g16_b8",
    "test_jpg_s16_g32_b32",
    "text_s32_g32_b16",
    "text_s32_g32_b16_stop",
    "wide_s8_g16_b8_cfg1",
    "text_s16_g16_b8_suffix",
    "text_s16_g16_b8_suffix_stop",
    "wide_s8_g32_b16",
]


@pytest.mark.parametrize(
    "case_id", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("test_jpg") else c for c in CASE_IDS]
)  # the real-shaped image (3.6k tokens) is slow; every other case runs in the fast tier
def test_golden_generation_ids_and_trace(golden_dir, golden_model, case_id):
    case = _cases(golden_dir)[case_id]
    model = golden_model
    ids = expand_golden_ids(case["input_ids"], case["images"], model.config.image_token_id)
    assert ids.shape[1] == case["prompt_merged_len"]
    images = golden_image_inputs(golden_dir, case["images"][0]) if case["images"] else {}
    out = model.diffusion_generate(ids, **images, **_settings(case), return_dict_in_generate=True, output_history=True)
    prompt_len, answer_len = ids.shape[1], case["settings"]["gen_length"]
    suffix = case["settings"]["suffix_token_ids"] or []
    n = int(out.answer_lengths[0])
    returned = out.sequences[0, prompt_len : prompt_len + n + len(suffix)].tolist()
    assert returned == case["generated_ids"]
    assert out.sequences[0, prompt_len + n + len(suffix) :].eq(model.config.pad_token_id).all()

    trace = case["trace"]
    assert out.num_forward_passes == trace["num_forward_calls"]
    mask_id = case["settings"]["mask_id"]
    answers = [torch.full((answer_len,), mask_id)] + [h[0, prompt_len : prompt_len + answer_len] for h in out.history]
    assert [int((a == mask_id).sum()) for a in answers[:-1]] == trace["masked_count_per_call"]
    for position, call in enumerate(trace["commit_call_per_generated_position"]):
        if call >= 0:  # the forward pass whose prediction filled this position
            filled_at = next(i for i, a in enumerate(answers[1:]) if a[position] != mask_id)
            assert filled_at == call, f"position {position}: committed at pass {filled_at}, official {call}"


@pytest.mark.slow
def test_golden_batch_of_four_prompts_equals_single_runs(golden_dir, golden_model):
    """Two image prompts and two text prompts of different lengths, left-padded into one batch."""
    model = golden_model
    cases = _cases(golden_dir)
    wide, text = cases["wide_s8_g16_b8"], cases["text_s32_g32_b16"]
    image_id = model.config.image_token_id
    wide_ids = expand_golden_ids(wide["input_ids"], wide["images"], image_id)[0]
    other_question = wide["input_ids"][:15] + [3923, 374, 420, 30] + wide["input_ids"][-5:]
    prompts = [
        wide_ids,
        torch.tensor(text["input_ids"]),
        expand_golden_ids(other_question, wide["images"], image_id)[0],
        torch.tensor(text["input_ids"][:5] + text["input_ids"][12:]),  # without the system prompt text
    ]
    images = golden_image_inputs(golden_dir, "images/wide_300x100.png")
    has_image = [True, False, True, False]
    settings = dict(_settings(wide), return_dict_in_generate=True)

    singles = {}
    for stops in (None, [[35958]]):
        singles[str(stops)] = [
            model.diffusion_generate(p[None], **(images if img else {}), **{**settings, "stop_token_ids": stops})
            for p, img in zip(prompts, has_image)
        ]
    # Row 0 alone is the golden case itself.
    assert singles["None"][0].sequences[0, len(prompts[0]) :].tolist() == wide["generated_ids"]

    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id
    ids = torch.full((4, width), pad)
    mask = torch.zeros(4, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    batch_images = {
        "pixel_values": torch.cat([images["pixel_values"]] * 2),
        "image_sizes": torch.cat([images["image_sizes"]] * 2),
    }
    for stops in (None, [[35958]]):
        out = model.diffusion_generate(
            ids, attention_mask=mask, **batch_images, **{**settings, "stop_token_ids": stops}
        )
        for row, single in enumerate(singles[str(stops)]):
            assert out.sequences[row, width:].tolist() == single.sequences[0, len(prompts[row]) :].tolist(), row
            assert int(out.forward_passes_per_row[row]) == single.num_forward_passes
    stopped = [s.num_forward_passes for s in singles["[[35958]]"]]
    assert min(stopped) < 8 and out.num_forward_passes == max(stopped)
