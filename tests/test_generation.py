"""diffusion_generate: pure sampling helpers, a scripted mock model (no weights), tiny random models against
the official-mirror reference loop, batching, config round trips and bad input."""

import importlib
import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from llada_v import LladaVConfig, LladaVGenerationConfig, LladaVModel
from llada_v.denoising_llada_v import _active, _candidates, _DenoisingState, _finish_rows
from llada_v.generation_utils import (
    LladaVGenerateOutput,
    filter_top_k_top_p,
    find_stop,
    normalize_stop_sequences,
    sample_tokens,
    select_top_k,
    token_confidence,
    transfer_schedule,
)
from llada_v.sampling_llada_v import ClassifierFreeGuidance, DiffusionSampler

from official_sampler import reference_generate
from scripted import ScriptedModel
from tiny import image_prompt, tiny_model

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize("masks,steps", [(8, 8), (8, 3), (32, 16), (5, 5), (7, 2), (16, 4), (3, 5)])
def test_transfer_schedule_is_floor_plus_one_for_first_remainder_steps(masks, steps):
    schedule = transfer_schedule(masks, steps)
    assert schedule.shape == (1, steps)
    expected = [masks // steps + (1 if i < masks % steps else 0) for i in range(steps)]
    assert schedule[0].tolist() == expected
    assert int(schedule.sum()) == masks


def test_transfer_schedule_is_per_row():
    schedule = transfer_schedule(torch.tensor([8, 5, 0]), 4)
    assert schedule.tolist() == [[2, 2, 2, 2], [2, 1, 1, 1], [0, 0, 0, 0]]


def test_sample_tokens_is_argmax_at_temperature_zero():
    logits = torch.randn(7, 50)
    assert torch.equal(sample_tokens(logits, 0.0), logits.argmax(-1))


def test_gumbel_max_samples_the_softmax_distribution():
    # argmax(exp(l) / E) with E ~ Exp(1) picks i with probability softmax(l)_i (an exponential race).
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(40000, 2).contiguous()
    tokens = sample_tokens(logits, 1.0, torch.Generator().manual_seed(0))
    assert abs(tokens.float().mean().item() - 0.75) < 0.01


def test_gumbel_noise_reproducible_with_generator_and_bounded_chunks():
    logits = torch.randn(300, 40000)  # chunked: the float64 noise is never (300, 40000) at once
    a = sample_tokens(logits, 0.7, torch.Generator().manual_seed(3))
    b = sample_tokens(logits, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_low_confidence_is_float64_softmax_probability_of_the_token():
    logits = torch.randn(5, 11)
    tokens = torch.tensor([0, 3, 10, 2, 2])
    conf = token_confidence(logits, tokens, "low_confidence")
    assert conf.dtype == torch.float64
    expected = torch.softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.equal(conf, expected)


def test_random_remasking_confidence_uses_generator():
    tokens = torch.zeros(6, dtype=torch.long)
    a = token_confidence(torch.zeros(6, 3), tokens, "random", torch.Generator().manual_seed(1))
    b = token_confidence(torch.zeros(6, 3), tokens, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and bool(((a >= 0) & (a < 1)).all())


def test_select_top_k_never_picks_minus_inf():
    conf = torch.tensor([[0.1, NEG_INF, 0.9, 0.5], [NEG_INF, NEG_INF, 0.2, NEG_INF]], dtype=torch.float64)
    chosen = select_top_k(conf, torch.tensor([2, 3]))
    assert chosen.tolist() == [[False, False, True, True], [False, False, True, False]]
    assert not select_top_k(conf, [0, 0]).any()


def test_find_stop_earliest_occurrence_and_multi_token_sequences():
    gen = torch.tensor([5, 9, 7, 9, 7, 1])
    assert find_stop(gen, [[9, 7]]) == 1
    assert find_stop(gen, [[7, 1]]) == 4
    assert find_stop(gen, [[2]]) is None
    assert find_stop(gen, [[9, 7]], stop_index=0) == 0  # a later occurrence never moves the stop back
    assert find_stop(gen, [[7]], stop_index=4) == 2  # an earlier one does


def test_find_stop_rechecks_only_the_first_criterion_once_found():
    # Golden quirk 15: the loop breaks after the first criterion as soon as any stop is known.
    gen = torch.tensor([3, 4, 5, 6])
    assert find_stop(gen, [[6], [4]]) == 3  # first criterion found: the second is not looked at
    assert find_stop(gen, [[8], [5]]) == 2  # first criterion absent: the second is checked
    assert find_stop(gen, [[8], [4]], stop_index=2) == 2  # stop known: only [8] re-checked
    assert find_stop(gen, [[4], [3]], stop_index=2) == 1


def test_normalize_stop_sequences_accepts_ints_and_lists():
    assert normalize_stop_sequences(None) == []
    assert normalize_stop_sequences([126348, [1, 2]]) == [[126348], [1, 2]]
    for bad in ([[]], "eot", [["a"]], [-1]):
        with pytest.raises(ValueError):
            normalize_stop_sequences(bad)


def test_guidance_runs_conditional_rows_first_then_their_unconditional_copies():
    cond, uncond = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [5.0, 5.0]])
    guided = ClassifierFreeGuidance(0.5)
    doubled = guided.double(cond, uncond)
    assert doubled.tolist() == [[1.0, 2.0], [3.0, 4.0], [0.0, 1.0], [5.0, 5.0]] and guided.copies == 2
    assert guided.combine(doubled).tolist() == [[1.5, 2.5], [2.0, 3.5]]  # un + 1.5 (cond - un)
    assert guided.rows(torch.tensor([0, 2]), 3).tolist() == [0, 2, 3, 5]  # both copies of rows 0 and 2
    plain = ClassifierFreeGuidance(0.0)
    assert plain.double(cond, uncond) is cond and plain.combine(cond) is cond and plain.copies == 1


def _sampler(**settings):
    config = LladaVGenerationConfig(**{"max_new_tokens": 4, "steps": 2, "block_length": 4, **settings})
    return DiffusionSampler(config, suppress=torch.tensor([1]), batch=2)


def test_sampler_commits_the_scheduled_most_confident_candidates():
    sampler = _sampler()
    sampler.start_block(torch.tensor([4, 3]))  # schedules [2, 2] and [2, 1]
    canvas = torch.full((2, 6), 9)
    rows, positions = torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5])
    candidate = torch.tensor([[True, True, True, True], [True, True, False, True]])
    tokens = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    confidence = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.2, 0.99, 0.1]], dtype=torch.float64)
    committed = sampler.commit(canvas, rows, positions, candidate, tokens, confidence, block_step=1)
    assert committed.tolist() == [[False, True, True, False], [True, False, False, False]]  # 0.99: no candidate
    assert canvas.tolist() == [[9, 9, 9, 21, 22, 9], [9, 9, 30, 9, 9, 9]]


def test_sampler_with_a_threshold_also_commits_every_candidate_above_it():
    sampler = _sampler(confidence_threshold=0.25, steps=4)
    sampler.start_block(torch.tensor([4, 4]))  # one token per step by the schedule
    canvas = torch.full((2, 4), 9)
    candidate = torch.tensor([[True, True, True, False], [True, True, True, True]])
    confidence = torch.tensor([[0.1, 0.9, 0.5, 0.8], [0.3, 0.2, 0.24, 0.1]], dtype=torch.float64)
    committed = sampler.commit(
        canvas, torch.tensor([0, 1]), torch.arange(4), candidate, torch.arange(8).view(2, 4), confidence, 0
    )
    assert committed.tolist() == [[False, True, True, False], [True, False, False, False]]  # 0.5 > 0.25 too


def test_sampler_predicts_without_suppressed_or_out_of_tokenizer_ids():
    sampler = _sampler(tokenizer_vocab_size=4)
    logits = torch.tensor([[[0.0, 9.0, 1.0, 2.0, 8.0], [3.0, 9.0, 0.0, 0.0, 9.0]]])  # (1, 2, 5)
    tokens, confidence = sampler.predict(logits, torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool))
    assert tokens.tolist() == [[3, 0]]  # id 1 suppressed, id 4 outside the tokenizer
    assert confidence[0, 0] == torch.softmax(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), -1)[2]


def test_finished_rows_are_decided_in_one_place_and_selecting_active_rows_changes_nothing():
    state = _DenoisingState(
        canvas=torch.tensor([[1, 5, 37, 37], [1, 5, 6, 37], [1, 37, 37, 37]]), attention_mask=None,
        prompt_embeds=torch.zeros(3, 1, 1), prompt_len=1, answer_len=3, mask_token_id=37,
        stop_index=[2, 1, None], done=torch.zeros(3, dtype=torch.bool),
        passes_per_row=torch.zeros(3, dtype=torch.long), columns=torch.arange(4),
    )  # fmt: skip
    candidate = _candidates(state, block_end=4)
    assert candidate.tolist() == [[False, False, True, False], [False, False, False, False],
                                  [False, True, True, True]]  # fmt: skip
    _finish_rows(state, block_start=1)
    assert state.done.tolist() == [False, False, False]  # both stops are after the block start
    active = _active(state, candidate, 1, 4)
    assert state.done.tolist() == [False, False, False] and active.rows.tolist() == [0, 1, 2]  # pure
    _finish_rows(state, 1, candidate)
    assert state.done.tolist() == [False, True, False]  # row 1 has nothing left before its stop
    assert _active(state, candidate, 1, 4).rows.tolist() == [0, 2]
    _finish_rows(state, block_start=3)
    assert state.done.tolist() == [True, True, False]  # a block at or after row 0's stop is never decoded


def _script(n, base=2, increasing=True):
    targets = [base + (i % 30) for i in range(n)]
    scores = [1.0 + (i if increasing else n - i) for i in range(n)]
    return targets, scores


def test_mock_commits_most_confident_first_and_blocks_left_to_right():
    model = ScriptedModel(scripts={7: _script(8, increasing=True)})
    out = model.diffusion_generate(
        torch.tensor([[3, 4, 5, 7]]), max_new_tokens=8, block_length=4, steps=8, return_dict_in_generate=True,
        output_history=True,
    )  # fmt: skip
    targets = _script(8)[0]
    assert out.sequences[0].tolist() == [3, 4, 5, 7] + targets
    assert out.num_forward_passes == 8 and out.forward_passes_per_row.tolist() == [8]
    # Scores increase to the right: within each block positions are committed right to left.
    answers = [h[0, 4:].tolist() for h in out.history]
    assert answers[0] == [37, 37, 37, targets[3], 37, 37, 37, 37]
    first_commit = [next(i for i, h in enumerate(answers) if h[c] != 37) for c in range(8)]
    assert first_commit == [3, 2, 1, 0, 7, 6, 5, 4]


def test_mock_logits_only_at_uncommitted_columns_of_the_current_block():
    model = ScriptedModel(scripts={7: _script(8)})
    model.diffusion_generate(torch.tensor([[3, 4, 5, 7]]), max_new_tokens=8, block_length=4, steps=4)
    assert [c.positions for c in model.calls] == [[4, 5, 6, 7], [4, 5], [8, 9, 10, 11], [8, 9]]


def test_mock_uneven_schedule_commits_remainder_first():
    model = ScriptedModel(scripts={7: _script(7)})
    seen = []
    model.diffusion_generate(
        torch.tensor([[3, 4, 5, 7]]), max_new_tokens=7, block_length=7, steps=3,
        step_callback=lambda s: seen.append(int(s.committed.sum())),
    )  # fmt: skip
    assert seen == [3, 2, 2]


def test_mock_suppressed_and_out_of_tokenizer_ids_are_never_generated():
    targets = [1, 38, 39, 5]  # 1 is suppressed, 38 and 39 are >= tokenizer_vocab_size (38)
    model = ScriptedModel(scripts={7: (targets, [9.0, 9.0, 9.0, 9.0])})
    seq = model.diffusion_generate(torch.tensor([[3, 4, 5, 7]]), max_new_tokens=4, block_length=4, steps=4)
    answer = seq[0, 4:].tolist()
    assert not {1, 38, 39} & set(answer[:3]) and answer[3] == 5


def test_mock_stop_truncates_pads_and_ends_early():
    targets, scores = _script(8)
    targets[2] = 33  # the stop id, committed first (highest score in block)
    scores[2] = 100.0
    model = ScriptedModel(scripts={7: (targets, scores)})
    out = model.diffusion_generate(
        torch.tensor([[3, 4, 5, 7]]), max_new_tokens=8, block_length=8, steps=8, stop_token_ids=[[33]],
        return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences[0].tolist() == [3, 4, 5, 7, targets[0], targets[1]] + [0] * 6
    assert out.answer_lengths.tolist() == [2]
    assert out.num_forward_passes == 3  # stop at step 0, then the two positions before it


def test_mock_suffix_is_visible_never_overwritten_and_follows_the_stop():
    targets, scores = _script(6)
    targets[3], scores[3] = 33, 100.0
    model = ScriptedModel(scripts={7: (targets + [0, 0], scores + [50.0, 50.0])})
    out = model.diffusion_generate(
        torch.tensor([[3, 4, 5, 7]]), max_new_tokens=6, block_length=6, steps=6, suffix_token_ids=[20, 21],
        stop_token_ids=[[33]], return_dict_in_generate=True, output_history=True,
    )  # fmt: skip
    assert all(h[0, -2:].tolist() == [20, 21] for h in out.history)
    assert out.sequences[0].tolist() == [3, 4, 5, 7, *targets[:3], 20, 21, 0, 0, 0]
    assert all(max(c.positions) < 10 for c in model.calls)  # suffix columns never get logits


def test_mock_batch_rows_have_own_stop_and_finished_rows_leave_the_forward():
    t_stop, s_stop = _script(8)
    t_stop[1], s_stop[1] = 33, 100.0
    model = ScriptedModel(scripts={7: (t_stop, s_stop), 8: _script(8, base=10)})
    prompts = torch.tensor([[3, 4, 5, 7], [0, 0, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.diffusion_generate(
        prompts, attention_mask=mask, max_new_tokens=8, block_length=4, steps=8, stop_token_ids=[[33]],
        return_dict_in_generate=True,
    )  # fmt: skip
    assert out.sequences[0, 4:].tolist() == [t_stop[0]] + [0] * 7
    assert out.sequences[1, 4:].tolist() == _script(8, base=10)[0]
    assert [c.rows for c in model.calls] == [2, 2] + [1] * 6
    assert out.forward_passes_per_row.tolist() == [2, 8] and out.num_forward_passes == 8
    assert model.calls[0].mask.shape[0] == 2 and model.calls[-1].mask.shape[0] == 1


# ----------------------------------------------------------------------------------------------------------
# Tiny random models: parity with the official-mirror loop, batching, dtype


def _reference(model, ids, pixel_values=None, image_sizes=None, **settings):
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, pixel_values, image_sizes)
    cfg = model.config
    tokens, passes = reference_generate(
        model, embeds, mask_id=cfg.mask_token_id, vocab_limit=cfg.tokenizer_vocab_size,
        suppressed_ids=(cfg.eos_token_id, cfg.bos_token_id, cfg.start_header_token_id), **settings,
    )  # fmt: skip
    return tokens, passes


def _ours(model, ids, **kwargs):
    out = model.diffusion_generate(ids, return_dict_in_generate=True, **kwargs)
    p = ids.shape[1]
    return out.sequences[0, p:].tolist(), out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_model(seed=0)


def test_tiny_generation_config_from_model_config(tiny):
    gc = tiny.generation_config
    cfg = tiny.config
    assert isinstance(gc, LladaVGenerationConfig)
    assert gc.mask_token_id == cfg.mask_token_id and gc.pad_token_id == cfg.pad_token_id
    assert gc.stop_token_ids == [[cfg.eot_token_id]]
    assert gc.suppress_tokens == [
        cfg.eos_token_id,
        cfg.bos_token_id,
        cfg.start_header_token_id,
        cfg.end_header_token_id,
    ]
    assert gc.tokenizer_vocab_size == cfg.tokenizer_vocab_size


SETTINGS = {
    "one_block": dict(steps=8, gen_length=8, block_length=8),
    "two_blocks_two_per_step": dict(steps=4, gen_length=16, block_length=8),
    "uneven_schedule": dict(steps=3, gen_length=8, block_length=8),
    "cfg": dict(steps=4, gen_length=8, block_length=4, cfg_scale=1.5),
    "suffix": dict(steps=6, gen_length=12, block_length=4, suffix_token_ids=[7, 8, 9]),
}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("with_image", [False, True])
def test_matches_official_reference_loop(tiny, name, with_image):
    s = SETTINGS[name]
    if with_image:
        ids, pixel_values, sizes = image_prompt(tiny.config)
    else:
        ids, pixel_values, sizes = torch.tensor([[121, 9, 10, 11, 12, 13]]), None, None
    want, passes = _reference(tiny, ids, pixel_values, sizes, stop_token_ids=None, **s)
    got, out = _ours(
        tiny, ids, pixel_values=pixel_values, image_sizes=sizes, steps=s["steps"], max_new_tokens=s["gen_length"],
        block_length=s["block_length"], cfg_scale=s.get("cfg_scale", 0.0),
        suffix_token_ids=s.get("suffix_token_ids"), stop_token_ids=None,
    )  # fmt: skip
    assert got == want and out.num_forward_passes == passes


def test_matches_reference_with_stop_sequences(tiny):
    ids = torch.tensor([[121, 9, 10, 11, 12, 13]])
    settings = dict(steps=16, gen_length=16, block_length=8)
    free, _ = _reference(tiny, ids, stop_token_ids=None, **settings)
    # Stops that really occur: a single id, a two-token sequence, and two criteria (quirk 15).
    for stops in ([[free[9]]], [free[4:6]], [[free[11]], [free[3]]], [[free[2]]]):
        want, passes = _reference(tiny, ids, stop_token_ids=stops, **settings)
        got, out = _ours(
            tiny, ids, steps=16, max_new_tokens=16, block_length=8, stop_token_ids=stops, suffix_token_ids=[5, 6]
        )
        want_suffix, _ = _reference(tiny, ids, stop_token_ids=stops, suffix_token_ids=[5, 6], **settings)
        n = int(out.answer_lengths[0])
        assert got[: n + 2] == want_suffix and all(t == tiny.config.pad_token_id for t in got[n + 2 :])
        got_plain, out_plain = _ours(tiny, ids, steps=16, max_new_tokens=16, block_length=8, stop_token_ids=stops)
        assert got_plain[: int(out_plain.answer_lengths[0])] == want and out_plain.num_forward_passes == passes


def test_batch_of_four_equals_single_runs(tiny):
    """Different lengths, with and without images, left padding, a stop that ends some rows early."""
    cfg = tiny.config
    img_a, pix_a, size_a = image_prompt(cfg, size_hw=(50, 30))
    img_b, pix_b, size_b = image_prompt(cfg, size_hw=(30, 60), text_before=(7, 8), text_after=(9,))
    prompts = [img_a[0], torch.tensor([121, 9, 10, 11]), img_b[0], torch.tensor([121, 15, 16, 17, 18, 19, 20, 3])]
    images = [(pix_a, size_a), None, (pix_b, size_b), None]
    kwargs = dict(steps=8, max_new_tokens=16, block_length=8, return_dict_in_generate=True)
    singles = []
    for p, im in zip(prompts, images):
        extra = {} if im is None else dict(pixel_values=im[0], image_sizes=im[1])
        singles.append(tiny.diffusion_generate(p[None], stop_token_ids=None, **kwargs, **extra))
    stop = singles[1].sequences[0, len(prompts[1]) + 5].item()  # occurs in row 1 (at least)
    singles_stop = []
    for p, im in zip(prompts, images):
        extra = {} if im is None else dict(pixel_values=im[0], image_sizes=im[1])
        singles_stop.append(tiny.diffusion_generate(p[None], stop_token_ids=[[stop]], **kwargs, **extra))

    width = max(len(p) for p in prompts)
    ids = torch.full((4, width), cfg.pad_token_id)
    mask = torch.zeros(4, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    pixel_values = torch.cat([pix_a, pix_b])
    sizes = torch.cat([size_a, size_b])
    for stops, reference in ((None, singles), ([[stop]], singles_stop)):
        out = tiny.diffusion_generate(
            ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=sizes, stop_token_ids=stops, **kwargs
        )
        for r, single in enumerate(reference):
            assert out.sequences[r, width:].tolist() == single.sequences[0, len(prompts[r]) :].tolist()
            assert out.sequences[r, width - len(prompts[r]) : width].tolist() == prompts[r].tolist()
            assert out.forward_passes_per_row[r] == single.num_forward_passes
    assert out.num_forward_passes == max(s.num_forward_passes for s in singles_stop)
    assert any(s.num_forward_passes < 8 for s in singles_stop)  # the stop really ended a row early


def test_batch_with_cfg_equals_single_runs(tiny):
    a, b = torch.tensor([121, 9, 10, 11, 12, 13]), torch.tensor([121, 30, 31])
    kwargs = dict(steps=4, max_new_tokens=8, block_length=4, cfg_scale=2.0, stop_token_ids=None)
    singles = [tiny.diffusion_generate(p[None], **kwargs)[0, len(p) :] for p in (a, b)]
    pad = tiny.config.pad_token_id
    ids = torch.stack([a, torch.cat([torch.full((3,), pad), b])])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    batch = tiny.diffusion_generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(batch[0, 6:], singles[0]) and torch.equal(batch[1, 6:], singles[1])


def test_temperature_zero_determinism_and_seeded_sampling(tiny):
    ids = torch.tensor([[121, 9, 10, 11]])
    kwargs = dict(steps=4, max_new_tokens=8, block_length=8, stop_token_ids=None)
    assert torch.equal(tiny.diffusion_generate(ids, **kwargs), tiny.diffusion_generate(ids, **kwargs))
    sample = lambda seed, **kw: tiny.diffusion_generate(  # noqa: E731
        ids, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kwargs, **kw
    )
    assert torch.equal(sample(0), sample(0))
    assert torch.equal(sample(5, remasking="random"), sample(5, remasking="random"))
    assert any(not torch.equal(sample(0), sample(s)) for s in range(1, 6))


def test_history_and_step_callback(tiny):
    ids = torch.tensor([[121, 9, 10, 11]])
    steps = []
    out = tiny.diffusion_generate(
        ids, steps=4, max_new_tokens=8, block_length=4, stop_token_ids=None, return_dict_in_generate=True,
        output_history=True, step_callback=steps.append,
    )  # fmt: skip
    assert isinstance(out, LladaVGenerateOutput)
    assert len(out.history) == len(steps) == out.num_forward_passes == 4
    mask_id = tiny.config.mask_token_id
    masks_left = [int((h[0, 4:] == mask_id).sum()) for h in out.history]
    assert masks_left == [6, 4, 2, 0]
    assert torch.equal(out.history[-1], out.sequences)
    s = steps[1]
    assert (s.block, s.block_step) == (0, 1) and s.logits.dtype == torch.float32
    assert s.logits.shape == (1, len(s.positions), tiny.config.text_config.vocab_size)
    assert int(s.committed.sum()) == 2 and set(s.positions.tolist()) <= set(range(4, 8))


def test_respects_model_dtype_bfloat16():
    model = tiny_model(seed=1).to(torch.bfloat16)
    ids, pixel_values, sizes = image_prompt(model.config)
    seen = []
    out = model.diffusion_generate(
        ids, pixel_values=pixel_values, image_sizes=sizes, steps=4, max_new_tokens=8, block_length=8,
        step_callback=lambda s: seen.append(s.logits.dtype), stop_token_ids=None,
    )  # fmt: skip
    assert out.shape == (1, ids.shape[1] + 8) and seen == [torch.float32] * 4
    assert model.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Config: released defaults, save / load


def test_released_defaults_from_the_default_model_config():
    gc = LladaVGenerationConfig.from_model_config(LladaVConfig())
    assert (gc.max_new_tokens, gc.steps, gc.block_length) == (128, 128, 128)
    assert (gc.temperature, gc.cfg_scale, gc.remasking) == (0.0, 0.0, "low_confidence")
    assert gc.mask_token_id == 126336 and gc.pad_token_id == 126081
    assert gc.suppress_tokens == [126081, 126080, 126346, 126347]
    assert gc.stop_token_ids == [[126348]] and gc.tokenizer_vocab_size == 126349
    assert gc.to_dict() == LladaVGenerationConfig().to_dict()


def test_generation_config_round_trips_through_model_save_and_load(tmp_path):
    tiny = tiny_model(seed=2)
    tiny.generation_config = LladaVGenerationConfig.from_model_config(tiny.config)
    tiny.generation_config.update(steps=4, max_new_tokens=8, block_length=4, suffix_token_ids=[3], cfg_scale=0.5)
    tiny.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["steps"] == 4 and saved["suffix_token_ids"] == [3]
    loaded = LladaVModel.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, LladaVGenerationConfig)
    assert loaded.generation_config.to_dict() == tiny.generation_config.to_dict()
    ids = torch.tensor([[121, 9, 10]])
    assert loaded.diffusion_generate(ids).shape == (1, 3 + 8 + 1)


def test_generation_config_keeps_fields_with_from_model_config_flag(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "steps": 2, "max_new_tokens": 4, "block_length": 2, "cfg_scale": 1.0})
    )
    gc = LladaVGenerationConfig.from_pretrained(tmp_path)
    assert (gc.steps, gc.max_new_tokens, gc.block_length, gc.cfg_scale) == (2, 4, 2, 1.0)


def test_none_suppress_tokens_survive_a_round_trip(tmp_path):
    gc = LladaVGenerationConfig(suppress_tokens=None, stop_token_ids=None)
    gc.save_pretrained(tmp_path)
    back = LladaVGenerationConfig.from_pretrained(tmp_path)
    assert back.suppress_tokens == [] and back.stop_token_ids is None


# ----------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_new_tokens=10, block_length=4, steps=5), r"max_new_tokens \(10\) must be divisible by block_length"),
        (dict(max_new_tokens=16, block_length=4, steps=6), r"steps \(6\) must be divisible by the number of blocks"),
        (dict(max_new_tokens=8, block_length=8, steps=16), r"steps \(16\) must not exceed max_new_tokens \(8\)"),
        (dict(max_new_tokens=0), r"max_new_tokens must be a positive integer, got 0"),
        (dict(steps=-2), r"steps must be a positive integer, got -2"),
        (dict(block_length=0), r"block_length must be a positive integer, got 0"),
        (dict(temperature=-0.5), r"temperature must be a finite number >= 0, got -0.5"),
        (dict(cfg_scale=-1.0), r"cfg_scale must be a finite number >= 0, got -1.0"),
        (dict(remasking="top_p"), r"remasking must be one of .*'top_p'"),
        (dict(stop_token_ids=[[]]), r"non-empty list of ids, got \[\]"),
        (dict(suffix_token_ids=[1, -3]), r"suffix_token_ids must be a list of token ids"),
    ],
)
def test_bad_settings_raise_value_error_naming_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LladaVGenerationConfig(**kwargs)


def test_bad_inputs_raise_value_error_naming_values(tiny):
    ids = torch.tensor([[121, 9, 10]])
    mask_id = tiny.config.mask_token_id
    small = dict(steps=2, max_new_tokens=4, block_length=4)
    with pytest.raises(ValueError, match=rf"prompt rows \[1\] contain the mask id {mask_id}"):
        tiny.diffusion_generate(torch.tensor([[121, 9, 10], [121, mask_id, 3]]), **small)
    with pytest.raises(ValueError, match=r"rows \[0\] of attention_mask are not left-padded"):
        tiny.diffusion_generate(ids, attention_mask=torch.tensor([[1, 1, 0]]), **small)
    short = tiny_model(text_config=dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=40,
    ))  # fmt: skip
    with pytest.raises(ValueError, match=r"\(3\) \+ max_new_tokens \(64\) \+ suffix \(0\) = 67 tokens exceeds"):
        short.diffusion_generate(ids, steps=8, max_new_tokens=64, block_length=64)
    with pytest.raises(ValueError, match=r"max_new_tokens \(6\) must be divisible by block_length \(4\)"):
        tiny.diffusion_generate(ids, steps=2, max_new_tokens=6, block_length=4)
    with pytest.raises(ValueError, match=r"suppress_tokens contain ids outside the vocabulary \(0..127\): \[126081\]"):
        tiny.diffusion_generate(ids, suppress_tokens=[126081], **small)
    with pytest.raises(ValueError, match=r"stop_strings need the `tokenizer`"):
        tiny.diffusion_generate(ids, stop_strings=["\n"], **small)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['gen_length'\]"):
        tiny.diffusion_generate(ids, gen_length=4)


def test_config_from_the_other_module_copy_keeps_none_fields(tiny, tmp_path, monkeypatch):
    # Remote code loads the modules a second time (as a package of their own): its config class is a
    # different object.
    from llada_v.checkpoint_io import write_remote_code

    package = tmp_path / "remote_copy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_remote_code(package)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("remote_copy.generation_utils")
    foreign = module.LladaVGenerationConfig(stop_token_ids=None, steps=2, max_new_tokens=4, block_length=4)
    assert not isinstance(foreign, LladaVGenerationConfig)
    resolved = tiny._resolve_generation_config(foreign, {})
    assert resolved.stop_token_ids is None and (resolved.steps, resolved.max_new_tokens) == (2, 4)


def test_stop_strings_and_text_suffix_are_encoded_with_the_tokenizer():
    vocab = {"STOP": [33], "SUF": [20, 21]}
    tokenizer = SimpleNamespace(encode=lambda text, add_special_tokens: vocab[text])
    targets, scores = _script(6)
    targets[3], scores[3] = 33, 100.0
    model = ScriptedModel(scripts={7: (targets, scores)})
    out = model.diffusion_generate(
        torch.tensor([[3, 4, 5, 7]]), max_new_tokens=6, block_length=6, steps=6, stop_strings=["STOP"],
        generation_suffix="SUF", tokenizer=tokenizer,
    )  # fmt: skip
    assert out[0].tolist() == [3, 4, 5, 7, *targets[:3], 20, 21, 0, 0, 0]


# ----------------------------------------------------------------------------------------------------------
# Hugging Face generation settings: honoured where masked diffusion gives them a meaning, refused elsewhere


def _scripted_run(targets, scores, **settings):
    model = ScriptedModel(targets, scores)
    n = len(targets)
    kwargs = dict(max_new_tokens=n, steps=n, block_length=n, return_dict_in_generate=True) | settings
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model.diffusion_generate(torch.tensor([[3, 4, 5, 6]]), **kwargs)


def test_top_k_and_top_p_restrict_the_sampled_choice():
    targets, scores = [2 + i for i in range(8)], [3.0] * 8  # each column: its target has p = e^3 / (e^3 + 39)
    hot = dict(temperature=5.0, generator=torch.Generator().manual_seed(0))
    free = _scripted_run(targets, scores, **hot).answer_ids()[0]
    assert free != targets  # at temperature 5 the choice wanders off the likeliest id
    for option in (dict(top_k=1), dict(top_p=0.1)):
        hot["generator"] = torch.Generator().manual_seed(0)
        assert _scripted_run(targets, scores, **hot, **option).answer_ids()[0] == targets


def test_filter_top_k_top_p_keeps_the_likeliest_ids():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.isinf(filter_top_k_top_p(logits.clone(), 2, None)).tolist() == [[False, True, False, True]]
    probs = torch.softmax(logits, -1)[0].tolist()  # 0.64, 0.09, 0.24, 0.03
    kept = ~torch.isinf(filter_top_k_top_p(logits.clone(), None, 0.8))
    assert kept.tolist() == [[True, False, True, False]] and probs[0] < 0.8 <= probs[0] + probs[2]


def test_eos_token_id_stops_and_bad_words_are_never_generated():
    targets, scores = [2, 3, 33, 5, 6, 7], [1.0, 2.0, 9.0, 3.0, 4.0, 5.0]
    stopped = _scripted_run(targets, scores, eos_token_id=33)
    assert stopped.answer_ids()[0] == [2, 3] and int(stopped.answer_lengths[0]) == 2
    banned = _scripted_run(targets, scores, bad_words_ids=[[33], [5]]).answer_ids()[0]
    assert 33 not in banned and 5 not in banned and banned[:2] == [2, 3]


def test_max_length_counts_the_prompt():
    out = _scripted_run([2 + i for i in range(6)], [1.0] * 6, max_length=8, steps=4, block_length=4)
    assert out.sequences.shape == (1, 8) and out.answer_ids()[0] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"max_length \(4\) leaves no room after the prompt \(4 tokens\)"):
        _scripted_run([2], [1.0], max_length=4)


def test_max_length_that_leaves_a_bad_answer_length_names_max_length_in_the_error():
    # 11 - 4 prompt tokens = 7 answer tokens, which block_length 4 does not divide.
    with pytest.raises(ValueError) as err:
        _scripted_run([2 + i for i in range(6)], [1.0] * 6, max_length=11, steps=4, block_length=4)
    assert str(err.value).startswith(
        "max_length (11) - prompt (4) = 7 new tokens: max_new_tokens (7) must be divisible by block_length (4)"
    )


@pytest.mark.parametrize(
    "setting",
    [
        dict(num_beams=2),
        dict(repetition_penalty=1.2),
        dict(min_new_tokens=3),
        dict(use_cache=True),
        dict(num_return_sequences=2),
        dict(no_repeat_ngram_size=3),
    ],
)
def test_autoregressive_settings_are_refused_by_name(setting):
    ((name, value),) = setting.items()
    with pytest.raises(ValueError, match=rf"{name}={value!r} has no meaning in masked diffusion"):
        _scripted_run([2, 3], [1.0, 1.0], **setting)


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(bad_words_ids=[[3, 4]]), "bad_words_ids must be a list of one-token lists"),
        (dict(top_k=5), r"need temperature > 0"),
        (dict(do_sample=True), r"do_sample=True contradicts temperature=0"),
        (dict(top_p=1.5, temperature=1.0), r"top_p must be a number in \(0, 1\]"),
    ],
)
def test_sampling_settings_that_cannot_apply_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        _scripted_run([2, 3], [1.0, 1.0], **setting)


@pytest.mark.parametrize("name", ["temperature", "cfg_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_temperature_and_guidance_are_refused(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got {value}"):
        LladaVGenerationConfig(**{name: value})


@pytest.mark.parametrize("temperature", [300.0, 1e4])
def test_huge_temperatures_never_pick_suppressed_or_out_of_vocabulary_ids(temperature):
    # exp(logits) / (-log u) ** T turns into 0/0 and inf/inf at such temperatures; the sample must stay valid.
    for seed in range(5):
        out = _scripted_run([2 + i for i in range(8)], [2.0] * 8, temperature=temperature,
                            generator=torch.Generator().manual_seed(seed)).answer_ids()[0]  # fmt: skip
        assert all(t != 1 and t < 38 for t in out), out  # 1 is suppressed, ids >= 38 are past the tokenizer


def test_a_plain_generation_config_is_validated_after_the_call_overrides():
    # What the plain config sets goes on top of the model's own settings, then the call's overrides.
    model = ScriptedModel([2, 3, 4, 5], [1.0] * 4)
    out = model.diffusion_generate(torch.tensor([[3, 4, 5, 6]]), generation_config=GenerationConfig(max_new_tokens=4),
                                   steps=4, block_length=4, return_dict_in_generate=True)  # fmt: skip
    assert out.answer_ids()[0] == [2, 3, 4, 5]
