"""dLLM-Cache (`LladaVGenerationConfig.dllm_cache`) against the official implementation's ids
(../shared/golden/dllm_cache.json: the official code with its cache hooks on and off), batches against single
runs, the settings, and the cost it reports."""

import json
import random

import pytest
import torch

from llada_v import LladaVGenerationConfig
from llada_v.dllm_cache_llada_v import (
    DLLM_CACHE_DEFAULTS,
    LladaVFeatureCache,
    dllm_cache_settings,
    transfer_index,
)

from helpers import expand_golden_ids, golden_image_inputs


def _dllm_cases(golden_dir):
    return {c["id"]: c for c in json.loads((golden_dir / "dllm_cache.json").read_text())["cases"]}


def _settings(case):
    s = case["settings"]
    return dict(
        steps=s["steps"],
        max_new_tokens=s["gen_length"],
        block_length=s["block_length"],
        cfg_scale=s["cfg_scale"],
        stop_token_ids=s["stop_token_ids"],
    )


def _prompt(golden_dir, model, case):
    ids = expand_golden_ids(case["input_ids"], case["images"], model.config.image_token_id)
    images = golden_image_inputs(golden_dir, case["images"][0]) if case["images"] else {}
    return ids, images


CASE_IDS = ["text_s32_g32_b16_dllm", "wide_s8_g16_b8_dllm", "test_jpg_s16_g32_b32_dllm", "text_s32_g32_b16_stop_dllm"]


@pytest.mark.parametrize(
    "case_id", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("test_jpg") else c for c in CASE_IDS]
)
def test_golden_dllm_cache_ids_equal_the_official_ones_with_the_cache_on_and_off(golden_dir, golden_model, case_id):
    case = _dllm_cases(golden_dir)[case_id]
    assert case["generated_ids"] != case["generated_ids_without_cache"]  # ignoring the cache cannot pass
    ids, images = _prompt(golden_dir, golden_model, case)
    on = golden_model.diffusion_generate(
        ids, **images, **_settings(case), dllm_cache=case["dllm_cache"], return_dict_in_generate=True
    )
    assert on.answer_ids()[0] == case["generated_ids"]
    off = golden_model.diffusion_generate(ids, **images, **_settings(case), return_dict_in_generate=True)
    assert off.answer_ids()[0] == case["generated_ids_without_cache"]
    assert on.num_forward_passes == off.num_forward_passes  # the cache changes what a pass computes, not how many
    assert on.num_decoder_tokens < off.num_decoder_tokens


def _left_pad(prompts, pad):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize("case_id", ["text_s32_g32_b16_dllm", "text_s32_g32_b16_stop_dllm"])
def test_golden_dllm_cache_left_padded_batch_equals_single_runs(golden_dir, golden_model, case_id):
    """The golden text prompt (official ids) left-padded beside the golden image prompt and a shorter text prompt,
    with one golden case's settings: every row equals its single run, the golden row the official ids."""
    cases = _dllm_cases(golden_dir)
    case, wide = cases[case_id], cases["wide_s8_g16_b8_dllm"]
    model = golden_model
    text_ids = torch.tensor(case["input_ids"])
    wide_ids, images = _prompt(golden_dir, model, wide)
    short = torch.tensor(case["input_ids"][:5] + case["input_ids"][12:])  # without the system prompt text
    prompts = [wide_ids[0], text_ids, short]
    settings = dict(_settings(case), dllm_cache=case["dllm_cache"], return_dict_in_generate=True)
    singles = [
        model.diffusion_generate(p[None], **(images if row == 0 else {}), **settings) for row, p in enumerate(prompts)
    ]
    assert singles[1].answer_ids()[0] == case["generated_ids"]
    ids, mask = _left_pad(prompts, model.config.pad_token_id)
    out = model.diffusion_generate(ids, attention_mask=mask, **images, **settings)
    for row, single in enumerate(singles):
        assert out.answer_ids()[row] == single.answer_ids()[0], row
        assert int(out.forward_passes_per_row[row]) == single.num_forward_passes
    assert out.answer_ids()[1] == case["generated_ids"]


def test_dllm_cache_batch_with_rows_on_different_clocks_equals_single_runs():
    """With a confidence threshold rows finish blocks after different numbers of passes, so in one pass rows
    refresh different parts: the pass runs them in groups, and each row still gives what it gives alone (the
    trained demo model, scene descriptions over two blocks)."""
    from llada_v.demo.app import load_demo
    from llada_v.demo.scenes import DESCRIPTION_ORDERS, describe, draw_scene
    from llada_v.inference import chat_prompt, prepare_inputs, user_message

    model, processor = load_demo()
    scenes = [draw_scene(random.Random(f"dllm-{i}")) for i in range(4)]
    # every other row with the default system prompt: prompts of different lengths (the scenes are all 280x56)
    texts = [chat_prompt(processor, [user_message(describe(scene, DESCRIPTION_ORDERS[i % 2])[0], 1)],
                         system_prompt=None if i % 2 else "") for i, scene in enumerate(scenes)]  # fmt: skip
    images = [[scene.image] for scene in scenes]
    settings = dict(
        max_new_tokens=8, steps=8, block_length=4, confidence_threshold=0.9,
        dllm_cache={"prompt_interval_steps": 3, "gen_interval_steps": 2, "transfer_ratio": 0.5},
        return_dict_in_generate=True,
    )  # fmt: skip
    singles = [
        model.diffusion_generate(**prepare_inputs(processor, [t], [i], model.device), **settings)
        for t, i in zip(texts, images)
    ]
    passes = [s.num_forward_passes for s in singles]
    assert len(set(passes)) > 1, passes  # two blocks: the rows meet the second block on different clocks
    batch = prepare_inputs(processor, texts, images, model.device)
    assert len(set(batch["attention_mask"].sum(-1).tolist())) > 1  # prompts of different lengths, left-padded
    out = model.diffusion_generate(**batch, **settings)
    assert out.answer_ids() == [s.answer_ids()[0] for s in singles]
    assert out.forward_passes_per_row.tolist() == passes


def test_dllm_cache_refreshing_everything_every_pass_equals_exact_mode(golden_dir, golden_model):
    """Both intervals 1: every pass recomputes every layer, so the answer is exact mode's (a different attention
    kernel, the same ids), whatever the transfer ratio."""
    case = _dllm_cases(golden_dir)["text_s32_g32_b16_dllm"]
    ids = torch.tensor([case["input_ids"]])
    settings = dict(_settings(case), return_dict_in_generate=True)
    exact = golden_model.diffusion_generate(ids, **settings)
    for ratio in (0.0, 1.0):
        every = {"prompt_interval_steps": 1, "gen_interval_steps": 1, "transfer_ratio": ratio}
        out = golden_model.diffusion_generate(ids, **settings, dllm_cache=every)
        assert out.answer_ids() == exact.answer_ids() == [case["generated_ids_without_cache"]]
        assert out.num_decoder_tokens == exact.num_decoder_tokens


def test_dllm_cache_with_a_suffix_keeps_it_and_returns_it(golden_dir, golden_model):
    case = _dllm_cases(golden_dir)["text_s32_g32_b16_dllm"]
    ids = torch.tensor([case["input_ids"]])
    suffix = [16533, 374, 126348]
    out = golden_model.diffusion_generate(
        ids, steps=16, max_new_tokens=16, block_length=8, suffix_token_ids=suffix, stop_token_ids=None,
        dllm_cache={"prompt_interval_steps": 4, "gen_interval_steps": 2}, return_dict_in_generate=True,
    )  # fmt: skip
    n = ids.shape[1]
    assert out.sequences[0, n + 16 :].tolist() == suffix
    assert golden_model.config.mask_token_id not in out.sequences[0].tolist()


# ---------------------------------------------------------------------------------------------- cost


def test_decoder_tokens_count_what_each_pass_recomputes():
    cache = LladaVFeatureCache(dllm_cache_settings({"prompt_interval_steps": 4, "gen_interval_steps": 2}), 1, 1, 100)
    total = 140  # 40 answer positions: int(40 * 0.25) = 10 moved between refreshes
    counts = []
    for done in range(8):
        ((_, view),) = cache.groups(torch.tensor([0]), torch.tensor([done]))
        counts.append(view.decoder_tokens(total))
    # pass 1: all; 2: 10 moved; 3: answer; 4: 10; 5: prompt refresh + answer refresh = all; 6: 10; 7: 40; 8: 10
    assert counts == [140, 10, 40, 10, 140, 10, 40, 10]
    settings = dllm_cache_settings({"prompt_interval_steps": 2, "gen_interval_steps": 3})
    prompt_only = LladaVFeatureCache(settings, 1, 1, 100)
    ((_, view),) = prompt_only.groups(torch.tensor([0]), torch.tensor([2]))  # pass 3: prompt refresh, answer not
    assert (view.refresh_prompt, view.refresh_answer) == (True, False)
    assert view.decoder_tokens(total) == 100 + 10


def test_groups_split_rows_by_their_refresh_decision():
    cache = LladaVFeatureCache(dllm_cache_settings({"prompt_interval_steps": 25, "gen_interval_steps": 7}), 4, 2, 10)
    groups = cache.groups(torch.tensor([0, 1, 3]), torch.tensor([7, 3, 0]))  # passes 8, 4 and 1
    decisions = [
        (index.tolist(), view.rows.tolist(), view.refresh_prompt, view.refresh_answer) for index, view in groups
    ]
    assert decisions == [([0], [0], False, True), ([1], [1], False, False), ([2], [3], True, True)]
    ((index, view),) = cache.groups(torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert view.rows is None and index.tolist() == [0, 1, 2, 3]  # the whole batch in order: no row copies


def test_transfer_index_picks_the_least_similar_value_vectors_per_row():
    cached = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
                           [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])  # fmt: skip
    new = torch.tensor([[[1.0, 0.1], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]],
                        [[0.0, 1.0], [1.0, 0.0], [1.0, 0.5], [1.0, 0.0]]])  # fmt: skip
    assert transfer_index(new, cached, 0.5).tolist() == [[3, 1], [0, 2]]
    assert transfer_index(new, cached, 0.25).tolist() == [[3], [0]]
    assert transfer_index(new, cached, 0.2).shape == (2, 0)  # int(4 * 0.2) = 0: nothing moves
    assert transfer_index(new, cached, 0.0).shape == (2, 0)


# ---------------------------------------------------------------------------------------------- settings


def test_empty_dict_means_the_official_defaults_and_none_means_off(tmp_path):
    assert dllm_cache_settings({}) == DLLM_CACHE_DEFAULTS == {
        "prompt_interval_steps": 25, "gen_interval_steps": 7, "transfer_ratio": 0.25,
    }  # fmt: skip
    assert dllm_cache_settings({"gen_interval_steps": 3})["prompt_interval_steps"] == 25
    assert dllm_cache_settings(None) is None
    assert LladaVGenerationConfig().dllm_cache is None
    LladaVGenerationConfig(dllm_cache={"transfer_ratio": 0.5}).save_pretrained(tmp_path)
    assert LladaVGenerationConfig.from_pretrained(tmp_path).dllm_cache == {"transfer_ratio": 0.5}


@pytest.mark.parametrize(
    "value, message",
    [
        ({"prompt_interval": 5}, r"unknown keys \['prompt_interval'\]"),
        ({"prompt_interval_steps": 0}, r"prompt_interval_steps must be a positive integer, got 0"),
        ({"gen_interval_steps": 2.0}, r"gen_interval_steps must be a positive integer, got 2.0"),
        ({"gen_interval_steps": True}, r"gen_interval_steps must be a positive integer, got True"),
        ({"transfer_ratio": 1.5}, r"transfer_ratio must be a number in \[0, 1\], got 1.5"),
        ({"transfer_ratio": "0.25"}, r"transfer_ratio must be a number in \[0, 1\], got '0.25'"),
        ([25, 7, 0.25], r"dllm_cache must be None or a dict"),
        (True, r"dllm_cache must be None or a dict"),
    ],
)
def test_bad_dllm_cache_settings_raise_value_error_naming_them(value, message):
    with pytest.raises(ValueError, match=message):
        LladaVGenerationConfig(dllm_cache=value)


def test_dllm_cache_refuses_kv_cache_and_cfg_by_name():
    with pytest.raises(ValueError, match=r"dllm_cache \(\{\}\) and kv_cache='dual' are two caches"):
        LladaVGenerationConfig(dllm_cache={}, kv_cache="dual")
    with pytest.raises(ValueError, match=r"dllm_cache \(\{\}\) is not supported with cfg_scale=1.0"):
        LladaVGenerationConfig(dllm_cache={}, cfg_scale=1.0)
    with pytest.raises(ValueError, match=r"kv_cache='prefix'"):
        LladaVGenerationConfig.fast(dllm_cache={}, kv_cache="prefix")
    LladaVGenerationConfig(dllm_cache={}, confidence_threshold=0.9)  # threshold decoding composes: one forward per pass


def test_feature_cache_refuses_training_labels(golden_model):
    cache = LladaVFeatureCache(dllm_cache_settings({}), 1, 2, 4)
    ((_, view),) = cache.groups(torch.tensor([0]), torch.tensor([0]))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with pytest.raises(ValueError, match="labels .* cannot be combined with a feature_cache"):
        golden_model(input_ids=ids, labels=ids, feature_cache=view)


def test_dllm_cache_composes_with_a_whole_vocabulary_lm_head_shortlist():
    """A shortlist of the whole vocabulary gives the full LM head's ids, with the feature cache too."""
    from llada_v.demo.app import load_demo
    from llada_v.demo.scenes import make_sample
    from llada_v.inference import chat_prompt, prepare_inputs, user_message

    model, processor = load_demo()
    samples = [make_sample(seed) for seed in (2, 3)]
    texts = [chat_prompt(processor, [user_message(s["qa"][0][0], 1)], system_prompt="") for s in samples]
    inputs = prepare_inputs(processor, texts, [[s["image"]] for s in samples], model.device)
    settings = dict(max_new_tokens=8, steps=8, block_length=4, return_dict_in_generate=True,
                    dllm_cache={"prompt_interval_steps": 3, "gen_interval_steps": 2, "transfer_ratio": 0.5})  # fmt: skip
    full = model.diffusion_generate(**inputs, **settings)
    vocab = model.get_output_embeddings().weight.shape[0]
    short = model.diffusion_generate(**inputs, **settings, lm_head_shortlist=vocab)
    assert short.answer_ids() == full.answer_ids()
    assert short.num_decoder_tokens == full.num_decoder_tokens
