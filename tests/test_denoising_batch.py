"""`LladaVDenoisingRun` / `LladaVDenoisingBatch`: denoising one pass at a time, runs joining and leaving between
passes. Every run must give exactly what its own `diffusion_generate` call gives, whatever joins or leaves when."""

from __future__ import annotations

import pytest
import torch

from llada_v.denoising_llada_v import LladaVDenoisingBatch

from tiny import image_prompt, tiny_model

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)


@pytest.fixture(scope="module")
def confident():
    """Peaked predictions (large initial weights): answers are not decided by float rounding."""
    return tiny_model(seed=0, text_config=dict(**TEXT, initializer_range=0.8))


def _prompts(model):
    """Four prompts of different lengths, two with an image each (crops seeded)."""
    torch.manual_seed(0)
    cfg = model.config
    ids_a, pix_a, size_a = image_prompt(cfg, size_hw=(50, 30))
    ids_b, pix_b, size_b = image_prompt(cfg, size_hw=(30, 60), text_before=(7, 8), text_after=(9,))
    return [
        dict(input_ids=ids_a, pixel_values=pix_a, image_sizes=size_a),
        dict(input_ids=torch.tensor([[121, 9, 10, 11]])),
        dict(input_ids=ids_b, pixel_values=pix_b, image_sizes=size_b),
        dict(input_ids=torch.tensor([[121, 15, 16, 17, 18, 19, 20, 3]])),
    ]


EXACT = dict(steps=8, max_new_tokens=16, block_length=8, stop_token_ids=None)
# Mixed lengths, schedules and modes; the cached, guided and dLLM-Cache passes run in their own forwards.
SETTINGS = [
    EXACT,
    dict(steps=4, max_new_tokens=8, block_length=4, stop_token_ids=None),
    dict(steps=24, max_new_tokens=24, block_length=8, stop_token_ids=None),
    dict(EXACT, temperature=0.7),  # seeded: the run's own generator
    dict(EXACT, kv_cache="dual", confidence_threshold=0.5),
    dict(EXACT, kv_cache="prefix", kv_cache_prompt_refresh="once"),
    dict(EXACT, cfg_scale=1.0),
    dict(EXACT, lm_head_shortlist=16),
    dict(EXACT, dllm_cache={"prompt_interval_steps": 4, "gen_interval_steps": 2}),
    dict(steps=16, max_new_tokens=16, block_length=16, stop_token_ids=None, confidence_threshold=0.3),
]


def _single(model, inputs, settings, seed):
    generator = torch.Generator().manual_seed(seed)
    return model.diffusion_generate(**inputs, return_dict_in_generate=True, generator=generator, **settings)


def _start(model, inputs, settings, seed):
    generator = torch.Generator().manual_seed(seed)
    return model.start_denoising(**inputs, return_dict_in_generate=True, generator=generator, **settings)


def _same(run_output, single):
    assert run_output.answer_ids() == single.answer_ids()
    assert torch.equal(run_output.sequences, single.sequences)
    assert run_output.num_forward_passes == single.num_forward_passes


def test_a_run_stepped_to_the_end_is_diffusion_generate(confident):
    inputs = _prompts(confident)[0]
    for settings in (EXACT, SETTINGS[4], SETTINGS[8]):
        run = _start(confident, inputs, settings, seed=1)
        passes = 0
        while run.step():
            passes += 1
        assert not run.step()  # a finished run runs nothing more
        output = run.finalize()
        _same(output, _single(confident, inputs, settings, seed=1))
        assert passes == output.num_forward_passes


def test_runs_joining_at_every_step_give_their_single_answers(confident):
    prompts = _prompts(confident)
    jobs = [(prompts[i % len(prompts)], settings, 100 + i) for i, settings in enumerate(SETTINGS)]
    singles = [_single(confident, inputs, settings, seed) for inputs, settings, seed in jobs]
    batch = LladaVDenoisingBatch(confident)
    runs, outputs, shared = [], {}, []
    waiting = list(range(len(jobs)))
    while waiting or len(batch):
        if waiting:  # one new request joins before every step
            index = waiting.pop(0)
            run = _start(confident, *jobs[index])
            runs.append(run)
            batch.add(run)
        step = batch.step()
        shared.append(step.forward_rows[0] if step.forward_rows else 0)
        for run in step.finished:
            outputs[runs.index(run)] = run.finalize()
    assert sorted(outputs) == list(range(len(jobs)))
    for index, single in enumerate(singles):
        _same(outputs[index], single)
    assert max(shared) >= 3  # plain passes of several runs really shared a forward


def test_a_run_that_leaves_mid_way_changes_no_other_run(confident):
    prompts = _prompts(confident)
    settings = dict(steps=16, max_new_tokens=16, block_length=8, stop_token_ids=None)
    singles = [_single(confident, p, settings, 0) for p in prompts]
    batch = LladaVDenoisingBatch(confident)
    runs = [_start(confident, p, settings, 0) for p in prompts]
    for run in runs:
        batch.add(run)
    for _ in range(5):
        batch.step()
    batch.remove(runs[1])  # its client went away
    assert len(batch) == 3
    outputs = {}
    while len(batch):
        for run in batch.step().finished:
            outputs[runs.index(run)] = run.finalize()
    assert sorted(outputs) == [0, 2, 3]
    for index in (0, 2, 3):
        _same(outputs[index], singles[index])
    assert runs[1].state.num_passes == 5


def test_a_batch_refuses_a_run_of_another_model(confident):
    other = tiny_model(seed=1, text_config=TEXT)
    run = _start(other, _prompts(other)[1], EXACT, 0)
    with pytest.raises(ValueError, match="batch of the model that started it"):
        LladaVDenoisingBatch(confident).add(run)


def test_apply_takes_only_the_planned_pass(confident):
    run = _start(confident, _prompts(confident)[1], EXACT, 0)
    planned = run.next_pass()
    assert run.next_pass() is planned  # planning twice plans once
    logits, tokens = run.logits(planned)
    run.apply(planned, logits, tokens)
    with pytest.raises(RuntimeError, match="once"):
        run.apply(planned, logits, tokens)


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(kv_cache="dual", confidence_threshold=0.5),
        dict(kv_cache="prefix", kv_cache_prompt_refresh="once"),
        dict(dllm_cache={"prompt_interval_steps": 4, "gen_interval_steps": 2}),
    ],
)
@pytest.mark.parametrize("after", [1, 3])
def test_a_row_dropped_from_a_run_changes_no_other_row(confident, options, after):
    """Rows of one left-padded run (`drop_row`, a client gone): the other rows give their single answers, in exact
    mode and with the caches, dropped at a block's first pass (a refresh) or inside a block."""
    prompts = [p for p in _prompts(confident) if "pixel_values" not in p]
    width = max(p["input_ids"].shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), confident.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - p["input_ids"].shape[1] :], mask[r, width - p["input_ids"].shape[1] :] = p["input_ids"][0], 1
    ids = torch.cat([ids, ids[:1]])  # a third row: the first prompt again, to be dropped
    mask = torch.cat([mask, mask[:1]])
    settings = dict(steps=12, max_new_tokens=12, block_length=4, stop_token_ids=None, **options)
    singles = [_single(confident, p, settings, 0) for p in prompts]
    run = _start(confident, dict(input_ids=ids, attention_mask=mask), settings, 0)
    for _ in range(after):
        run.step()
    run.next_pass()  # planned already, as the batch plans ahead
    passes = int(run.state.passes_per_row[2])
    run.drop_row(2)
    while run.step():
        pass
    assert int(run.state.passes_per_row[2]) == passes  # not even the planned pass
    assert run.state.num_passes > after
    for r, single in enumerate(singles):
        assert run.row_answer_ids(r) == single.answer_ids()[0], r
