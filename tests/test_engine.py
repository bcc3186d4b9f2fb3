"""The step scheduler (`llada_v.serving.engine.StepEngine`) in process, on the demo model: requests join at every
step and each answer equals its own single `generate_answers` call; cancelled requests leave without changing the
others; the token budget holds; streamed text adds up to the answer; a failing request fails alone."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")  # the serving room's module imports need the serve extra

from llada_v.demo.scenes import make_sample  # noqa: E402
from llada_v.inference import chat_prompt, generate_answers, generation_config_for, user_message  # noqa: E402
from llada_v.serving.batching import GenerationJob  # noqa: E402
from llada_v.serving.engine import RequestCancelled, StepEngine  # noqa: E402


def _job(demo, index: int, fast: bool = False, seed: int | None = None, sink=None, image: bool = True,
         **overrides) -> GenerationJob:  # fmt: skip
    model, processor, _ = demo
    sample = make_sample(500 + index)
    question = sample["qa"][0][0] if index % 3 else "Which shapes are there?"
    images = [sample["image"]] if image else []
    text = chat_prompt(processor, [user_message(question, len(images))], system_prompt="")
    config = generation_config_for(model.generation_config, overrides, fast=fast)
    return GenerationJob(text=text, images=images, config=config, seed=seed, sink=sink)


def _single(demo, job: GenerationJob):
    model, processor, _ = demo
    answers, output = generate_answers(model, processor, [job.text], [job.images], job.config, seed=job.seed)
    return answers[0].text, answers[0].num_tokens, int(output.answer_lengths[0])


MIXED = [
    {},
    dict(max_new_tokens=8),
    dict(max_new_tokens=16, steps=8, block_length=8),
    dict(max_new_tokens=8, temperature=0.8),  # seeded below
    dict(max_new_tokens=12, steps=12, block_length=4, stop_strings=["square"]),
    dict(max_new_tokens=8, cfg_scale=0.5),
    dict(max_new_tokens=8, dllm_cache={"prompt_interval_steps": 4, "gen_interval_steps": 2}),
]


def _drain(engine: StepEngine, results: dict, arrivals: list) -> int:
    """Step the engine, one arrival before each step, until every request is answered. Returns the steps."""
    steps = 0
    while arrivals or engine.running or engine.waiting:
        if arrivals:
            job, key = arrivals.pop(0)
            engine.submit(job, lambda result, key=key: results.__setitem__(key, result))
        engine.step()
        steps += 1
    return steps


@pytest.mark.slow
def test_requests_joining_at_every_step_get_their_single_answers(demo):
    model, processor, _ = demo
    jobs = [_job(demo, i, seed=7 if "temperature" in o else None, **o) for i, o in enumerate(MIXED)]
    jobs += [_job(demo, 10 + i, fast=True, max_new_tokens=8) for i in range(3)]  # the fast preset: cached passes
    jobs += [_job(demo, 20 + i) for i in range(6)]
    jobs += [_job(demo, 30 + i, image=False, max_new_tokens=8) for i in range(2)]  # text only
    expected = [_single(demo, job) for job in jobs]
    engine = StepEngine(model, processor, max_batch_tokens=100_000, max_batch_size=64)
    results: dict = {}
    _drain(engine, results, [(job, i) for i, job in enumerate(jobs)])
    for i, (text, tokens, length) in enumerate(expected):
        result = results[i]
        assert result.error is None, (i, result.error)
        assert (result.text, result.completion_tokens) == (text, tokens), (i, MIXED[i] if i < len(MIXED) else "")
        assert result.finish_reason == ("stop" if length < jobs[i].config.max_new_tokens else "length")
    snapshot = engine.metrics.snapshot()
    assert snapshot["llada_v_forward_rows_total"] > snapshot["llada_v_forward_passes_total"]  # passes were shared
    assert max(r.batch_size for r in results.values()) >= 3
    assert snapshot["llada_v_requests_total"] == len(jobs)
    assert snapshot["llada_v_running_requests"] == 0 == snapshot["llada_v_waiting_requests"]


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(demo):
    model, processor, _ = demo
    # Descriptions (indices divisible by 3): several blocks of passes each.
    jobs = [_job(demo, 30 + 3 * i, max_new_tokens=16, steps=16, block_length=4) for i in range(4)]
    expected = [_single(demo, job)[0] for job in jobs]
    engine = StepEngine(model, processor, max_batch_tokens=100_000, max_batch_size=8)
    results: dict = {}
    tickets = [engine.submit(job, lambda r, i=i: results.__setitem__(i, r)) for i, job in enumerate(jobs)]
    engine.step()
    engine.cancel(tickets[2])
    queued = _job(demo, 40)
    engine.submit(queued, lambda r: results.__setitem__("late", r))
    queued.cancelled = True  # a waiting request whose client left never starts
    while engine.running or engine.waiting:
        engine.step()
    assert isinstance(results[2].error, RequestCancelled)
    assert isinstance(results["late"].error, RequestCancelled)
    assert int(tickets[2].run.state.passes_per_row[tickets[2].row]) == 1  # it left before the second pass
    assert [results[i].text for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]
    assert engine.metrics.snapshot()["llada_v_requests_cancelled_total"] == 2


def test_the_running_batch_stays_within_the_token_budget(demo):
    model, processor, _ = demo
    jobs = [_job(demo, 50, max_new_tokens=8) for _ in range(5)]  # equal canvases: equal costs
    probe = StepEngine(model, processor, max_batch_tokens=10**6, max_batch_size=8)
    probe_ticket = probe.submit(jobs[0], lambda r: None)
    probe.step()
    cost = probe_ticket.canvas  # one request's canvas tokens
    engine = StepEngine(model, processor, max_batch_tokens=2 * cost + cost // 2, max_batch_size=8)
    results: dict = {}
    for i, job in enumerate(jobs):
        engine.submit(job, lambda r, i=i: results.__setitem__(i, r))
    while engine.running or engine.waiting:
        engine.step()
        assert len(engine.running) * max((t.canvas for t in engine.running), default=0) <= engine.max_batch_tokens
    assert max(results[i].batch_size for i in range(5)) == 2  # two requests ran together, never three
    assert all(results[i].error is None for i in range(5))
    alone = StepEngine(model, processor, max_batch_tokens=1, max_batch_size=8)  # larger than the budget: runs alone
    alone.submit(jobs[0], lambda r: results.__setitem__("alone", r))
    while alone.running or alone.waiting:
        alone.step()
    assert results["alone"].text == results[0].text


def test_streamed_text_adds_up_to_the_answer_and_the_first_token_is_timed(demo):
    model, processor, _ = demo
    events = []
    job = _job(demo, 61, sink=events.append, max_new_tokens=16, steps=16, block_length=4)
    engine = StepEngine(model, processor, max_batch_tokens=10**6, max_batch_size=8)
    results: dict = {}
    _drain(engine, results, [(job, 0)])
    text = "".join(e.text for e in events if e.kind == "delta")
    assert text == results[0].text == _single(demo, job)[0]
    assert events[0].kind == "started"
    assert "llada_v_time_to_first_token_seconds_count" in engine.metrics.render()


def test_a_request_that_cannot_start_fails_alone(demo):
    model, processor, _ = demo
    good = _job(demo, 70)
    bad = _job(demo, 71)
    bad.config.max_new_tokens = 5000  # beyond the model's positions: the sampler refuses it
    bad.config.steps = bad.config.block_length = 5000
    engine = StepEngine(model, processor, max_batch_tokens=10**6, max_batch_size=8)
    results: dict = {}
    _drain(engine, results, [(bad, "bad"), (good, "good")])
    assert isinstance(results["bad"].error, ValueError) and "max_position_embeddings" in str(results["bad"].error)
    assert results["good"].text == _single(demo, good)[0]


def test_bad_budgets_are_refused_naming_them(demo):
    model, processor, _ = demo
    with pytest.raises(ValueError, match=r"max_batch_tokens \(0\)"):
        StepEngine(model, processor, max_batch_tokens=0, max_batch_size=8)
