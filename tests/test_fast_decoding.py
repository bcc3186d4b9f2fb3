"""Fast decoding options of diffusion_generate: key/value caches across steps (`kv_cache`,
`kv_cache_prompt_refresh`), confidence-threshold parallel decoding, early exit, and the fast preset.

Each mode is checked against the invariant that must hold for it: what is exact stays exact (threshold 1.0,
one step per block, a one-layer decoder, early exit), batches equal single runs, refreshes happen once per
block, and bad values raise."""

import pytest
import torch

from llada_v import LladaVGenerationConfig
from llada_v.generation_utils import FAST_DECODING_PRESET

from scripted import ScriptedModel
from tiny import image_prompt, tiny_model

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def confident():
    """Larger weights: peaked predictions (max probability 0.3-0.9), so a threshold of 0.5 really fires."""
    return tiny_model(seed=0, text_config=dict(**TEXT, num_hidden_layers=2, initializer_range=0.8))


@pytest.fixture(scope="module")
def one_layer():
    return tiny_model(seed=3, text_config=dict(**TEXT, num_hidden_layers=1))


def _image_inputs(model):
    ids, pixel_values, sizes = image_prompt(model.config)
    return dict(input_ids=ids, pixel_values=pixel_values, image_sizes=sizes)


def _run(model, inputs, **kwargs):
    kwargs.setdefault("stop_token_ids", None)
    return model.diffusion_generate(**inputs, return_dict_in_generate=True, output_history=True, **kwargs)


def _same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert a.num_forward_passes == b.num_forward_passes
    assert all(torch.equal(x, y) for x, y in zip(a.history, b.history))


MULTI_BLOCK = dict(steps=8, max_new_tokens=16, block_length=8)


# ----------------------------------------------------------------------------------------------------------
# Defaults and the preset


def test_defaults_are_exact_mode():
    config = LladaVGenerationConfig()
    assert (config.kv_cache, config.confidence_threshold) == (None, None)
    assert config.kv_cache_prompt_refresh == "block"


def test_fast_preset_keeps_the_base_settings_and_lets_overrides_win(tiny):
    base = tiny.generation_config
    fast = LladaVGenerationConfig.fast(base, block_length=4)
    assert (fast.kv_cache, fast.confidence_threshold) == ("dual", 0.9)
    assert fast.mask_token_id == base.mask_token_id and fast.stop_token_ids == base.stop_token_ids
    assert fast.block_length == 4 and base.block_length == 128 and base.kv_cache is None  # base untouched
    assert LladaVGenerationConfig.fast(kv_cache="prefix").kv_cache == "prefix"
    assert {k: getattr(LladaVGenerationConfig.fast(), k) for k in FAST_DECODING_PRESET} == FAST_DECODING_PRESET
    with pytest.raises(TypeError, match=r"unknown generation settings \['cache'\]"):
        LladaVGenerationConfig.fast(cache="dual")


def test_fast_preset_round_trips_through_save_and_load(tmp_path):
    LladaVGenerationConfig.fast(kv_cache_prompt_refresh="once").save_pretrained(tmp_path)
    back = LladaVGenerationConfig.from_pretrained(tmp_path)
    assert (back.kv_cache, back.confidence_threshold, back.kv_cache_prompt_refresh) == ("dual", 0.9, "once")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kv_cache="full"), r"kv_cache must be None or one of \('dual', 'prefix'\), got 'full'"),
        (dict(kv_cache=True), r"kv_cache must be None or one of .*got True"),
        (dict(confidence_threshold=0.0), r"confidence_threshold must be None or a number in \(0, 1\], got 0.0"),
        (dict(confidence_threshold=1.5), r"confidence_threshold must be None or a number in \(0, 1\], got 1.5"),
        (dict(confidence_threshold="0.9"), r"confidence_threshold must be None or a number in \(0, 1\], got '0.9'"),
        (dict(confidence_threshold=True), r"confidence_threshold must be None or a number in \(0, 1\], got True"),
        (dict(confidence_threshold=0.9, remasking="random"), r"needs remasking='low_confidence', got .*'random'"),
        (dict(kv_cache="dual", kv_cache_prompt_refresh="never"), r"must be one of \('block', 'once'\), got 'never'"),
        (dict(kv_cache_prompt_refresh="once"), r"kv_cache_prompt_refresh='once' needs a kv_cache .* got kv_cache=None"),
    ],
)
def test_bad_fast_options_raise_value_error_naming_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LladaVGenerationConfig(**kwargs)


def test_bad_fast_options_raise_at_call_time_too(tiny):
    ids = torch.tensor([[121, 9, 10]])
    with pytest.raises(ValueError, match=r"got 'both'"):
        tiny.diffusion_generate(ids, steps=2, max_new_tokens=4, block_length=4, kv_cache="both")


# ----------------------------------------------------------------------------------------------------------
# Confidence threshold


@pytest.mark.parametrize(
    "settings",
    [
        MULTI_BLOCK,
        dict(steps=3, max_new_tokens=8, block_length=8),  # uneven schedule
        dict(steps=4, max_new_tokens=8, block_length=4, cfg_scale=1.5),
        dict(steps=6, max_new_tokens=12, block_length=4, suffix_token_ids=[7, 8, 9]),
    ],
)
def test_threshold_one_without_cache_equals_exact_mode(confident, settings):
    inputs = _image_inputs(confident)
    _same(_run(confident, inputs, confidence_threshold=1.0, **settings), _run(confident, inputs, **settings))


def _scripted(scores, **kwargs):
    targets = [2 + i for i in range(len(scores))]
    model = ScriptedModel(targets, scores)
    committed = []
    out = model.diffusion_generate(
        torch.tensor([[3, 4, 5, 6]]), return_dict_in_generate=True,
        step_callback=lambda s: committed.append(s.positions[s.committed[0]].tolist()), **kwargs,
    )  # fmt: skip
    return out, committed, targets


def test_threshold_commits_every_confident_candidate_besides_the_schedule():
    # probabilities: score 8 -> 0.987, 5 -> 0.79, 2 -> 0.16, 1 -> 0.065
    scores = [2.0, 8.0, 5.0, 1.0, 8.0, 2.0, 1.0, 5.0]
    out, committed, targets = _scripted(scores, max_new_tokens=8, block_length=8, steps=4, confidence_threshold=0.5)
    # Step 1: the scheduled two most confident (columns 1 and 4) plus 2 and 7 (0.79 > 0.5); step 2: the two
    # best left (0 and 5); step 3: the last two; the fourth step is not needed.
    assert [sorted(c) for c in committed] == [[5, 6, 8, 11], [4, 9], [7, 10]]
    assert out.num_forward_passes == 3 and out.sequences[0, 4:].tolist() == targets


def test_threshold_with_one_scheduled_token_per_step_commits_at_least_one():
    # Fast-dLLM's rule (steps = max_new_tokens): nothing is confident, so exactly one token per step.
    out, committed, _ = _scripted([1.0] * 6, max_new_tokens=6, block_length=6, steps=6, confidence_threshold=0.9)
    assert [len(c) for c in committed] == [1] * 6
    # Everything confident: one pass decodes the whole block.
    out, committed, _ = _scripted([9.0] * 6, max_new_tokens=6, block_length=6, steps=6, confidence_threshold=0.9)
    assert out.num_forward_passes == 1 and len(committed[0]) == 6


def test_threshold_never_commits_outside_the_current_block():
    out, committed, _ = _scripted([9.0] * 8, max_new_tokens=8, block_length=4, steps=8, confidence_threshold=0.5)
    assert committed == [[4, 5, 6, 7], [8, 9, 10, 11]]


def test_threshold_respects_the_stop():
    scores = [9.0, 9.0, 9.0, 20.0, 1.0, 9.0]
    targets = [2, 3, 4, 33, 5, 6]
    model = ScriptedModel(targets, scores)
    out = model.diffusion_generate(
        torch.tensor([[3, 4, 5, 6]]), max_new_tokens=6, block_length=6, steps=6, confidence_threshold=0.99,
        stop_token_ids=[[33]], return_dict_in_generate=True,
    )  # fmt: skip
    # Pass 1 commits everything confident (the stop included); the position after the stop is never decoded.
    assert out.sequences[0, 4:].tolist() == [2, 3, 4, 0, 0, 0] and out.num_forward_passes == 1


# ----------------------------------------------------------------------------------------------------------
# Key/value caches


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_cache_refreshes_once_per_block_then_recomputes_only_its_window(tiny, mode):
    inputs = _image_inputs(tiny)
    seen = []
    out = _run(tiny, inputs, kv_cache=mode, step_callback=seen.append, steps=12, max_new_tokens=24, block_length=8)
    prompt_len = inputs["input_ids"].shape[1]
    total = prompt_len + 24
    assert [s.block for s in seen if s.cache_refreshed] == [0, 1, 2]
    for s in seen:
        start = prompt_len + 8 * s.block
        if s.cache_refreshed:
            assert s.block_step == 0 and s.window == (0, total)
        else:
            assert s.window == (start, start + 8 if mode == "dual" else total)
    assert out.num_decoder_tokens == sum(s.window[1] - s.window[0] for s in seen)


def test_prompt_refresh_once_runs_one_full_forward_per_call(tiny):
    inputs = _image_inputs(tiny)
    seen = []
    _run(tiny, inputs, kv_cache="dual", kv_cache_prompt_refresh="once", step_callback=seen.append,
         steps=6, max_new_tokens=24, block_length=8)  # fmt: skip
    prompt_len = inputs["input_ids"].shape[1]
    total = prompt_len + 24
    full = [s.step for s in seen if s.window == (0, total)]
    assert full == [0]
    assert [s.window for s in seen if s.cache_refreshed][1:] == [(prompt_len, total)] * 2  # answer + suffix


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_cache_with_one_step_per_block_is_exact_mode(tiny, mode):
    # Every pass is then a refresh: a full forward whose keys/values are only stored.
    inputs = _image_inputs(tiny)
    settings = dict(steps=3, max_new_tokens=12, block_length=4)
    _same(_run(tiny, inputs, kv_cache=mode, **settings), _run(tiny, inputs, **settings))


@pytest.mark.parametrize(
    "options",
    [dict(kv_cache="dual"), dict(kv_cache="prefix"), dict(kv_cache="dual", kv_cache_prompt_refresh="once")],
)
@pytest.mark.parametrize(
    "extra", [{}, dict(suffix_token_ids=[7, 8]), pytest.param(dict(cfg_scale=1.0), marks=pytest.mark.slow)]
)
def test_cache_on_a_one_layer_model_equals_exact_mode(one_layer, options, extra):
    # One layer: every cached key/value depends only on its own position's token, which does not change while
    # it is cached (the prompt, finished blocks, masks of later blocks, the suffix).
    inputs = _image_inputs(one_layer)
    settings = dict(steps=12, max_new_tokens=24, block_length=8, **extra)
    exact = _run(one_layer, inputs, **settings)
    cached = _run(one_layer, inputs, **options, **settings)
    assert torch.equal(cached.sequences, exact.sequences) and cached.num_forward_passes == exact.num_forward_passes
    assert cached.num_decoder_tokens < exact.num_decoder_tokens


@pytest.mark.parametrize("mode", ["dual", "prefix"])
def test_cached_steps_are_the_model_cache_on_the_block_start_canvas(tiny, mode):
    # Two layers: cached keys/values outside the window are stale (they did not see this block's commits).
    # A refresh pass gives exactly the full-forward logits; every other pass gives exactly what the model's
    # cache API gives for its window over the keys/values stored at the block's start, which stays close to
    # (but is not) a full forward on the same canvas.
    from llada_v.generation_utils import LladaVDiffusionCache

    inputs = _image_inputs(tiny)
    p, mask_id = inputs["input_ids"].shape[1], tiny.config.mask_token_id
    seen = []
    out = _run(
        tiny,
        inputs,
        kv_cache=mode,
        steps=8,
        max_new_tokens=16,
        block_length=8,
        step_callback=lambda s: seen.append((s.cache_refreshed, s.window, s.positions, s.logits.clone())),
    )
    canvases = [torch.cat((inputs["input_ids"], torch.full((1, 16), mask_id)), dim=1), *out.history[:-1]]
    with torch.no_grad():
        prompt = tiny.embed_multimodal(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        embed = tiny.get_input_embeddings()
        stale = []
        for (refreshed, (start, end), positions, logits), canvas in zip(seen, canvases):
            full = tiny(inputs_embeds=torch.cat((prompt, embed(canvas[:, p:])), 1), logits_to_keep=positions).logits
            finite = torch.isfinite(logits)  # suppressed ids are -inf
            if refreshed:
                cache = LladaVDiffusionCache(tiny.config.text_config.num_hidden_layers)
                tiny(inputs_embeds=torch.cat((prompt, embed(canvas[:, p:])), 1), cache=cache)
                assert torch.equal(logits[finite], full[finite])
                continue
            window = tiny(inputs_embeds=embed(canvas[:, start:end]), cache=cache, cache_start=start,
                          logits_to_keep=positions - start).logits  # fmt: skip
            torch.testing.assert_close(logits[finite], window[finite], rtol=0, atol=1e-6)
            stale.append((logits[finite] - full[finite]).abs().max().item() / full.abs().max().item())
    assert len(stale) == 6 and 0 < max(stale) < 0.25


# ----------------------------------------------------------------------------------------------------------
# Early exit


def test_a_found_stop_skips_the_rest_of_the_block_and_the_later_blocks():
    targets, scores = [2, 33, 4, 5, 6, 7, 8, 9], [1.0, 9.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    model = ScriptedModel(targets, scores)
    kwargs = dict(max_new_tokens=8, block_length=4, steps=8, stop_token_ids=[[33]], return_dict_in_generate=True)
    out = model.diffusion_generate(torch.tensor([[3, 4, 5, 6]]), **kwargs)
    assert out.num_forward_passes == 2  # the stop, then the one position before it; block 1 never runs
    assert out.sequences[0, 4:].tolist() == [2] + [0] * 7


def test_early_exit_is_not_a_setting():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['early_exit'\]"):
        ScriptedModel([2], [1.0]).diffusion_generate(torch.tensor([[3]]), max_new_tokens=1, steps=1, block_length=1,
                                                     early_exit=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Batches: left padding, per-row caches, rows finishing at different steps


def _batch(model, seed: int = 0):
    """Four rows (two with images, two text-only) left-padded into one batch, and the same rows one by one. The
    crops are random: `seed` fixes them, so that a test's inputs do not depend on which tests ran before it."""
    torch.manual_seed(seed)
    cfg = model.config
    img_a, pix_a, size_a = image_prompt(cfg, size_hw=(50, 30))
    img_b, pix_b, size_b = image_prompt(cfg, size_hw=(30, 60), text_before=(7, 8), text_after=(9,))
    prompts = [img_a[0], torch.tensor([121, 9, 10, 11]), img_b[0], torch.tensor([121, 15, 16, 17, 18, 19, 20, 3])]
    images = [(pix_a, size_a), None, (pix_b, size_b), None]
    width = max(len(p) for p in prompts)
    ids = torch.full((4, width), cfg.pad_token_id)
    mask = torch.zeros(4, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([pix_a, pix_b]),
                 image_sizes=torch.cat([size_a, size_b]))  # fmt: skip
    singles = [dict(input_ids=p[None]) if im is None else dict(input_ids=p[None], pixel_values=im[0], image_sizes=im[1])
               for p, im in zip(prompts, images)]  # fmt: skip
    return batch, singles, width


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(dict(kv_cache="dual", confidence_threshold=0.5), marks=pytest.mark.slow),
        pytest.param(dict(kv_cache="prefix"), marks=pytest.mark.slow),
        dict(kv_cache="dual", kv_cache_prompt_refresh="once", confidence_threshold=0.4),
        dict(kv_cache="dual", confidence_threshold=0.5, cfg_scale=1.0),
    ],
)
def test_batch_equals_single_runs_for_fast_modes(confident, options):
    batch, singles, width = _batch(confident)
    settings = dict(steps=24, max_new_tokens=24, block_length=8, **options)
    free = _run(confident, singles[1], **settings)
    stop = free.sequences[0, 4 + 10].item()  # occurs in row 1, so rows end at different steps
    runs = [_run(confident, s, stop_token_ids=[[stop]], **settings) for s in singles]
    out = _run(confident, batch, stop_token_ids=[[stop]], **settings)
    for r, (single, inputs) in enumerate(zip(runs, singles)):
        p = inputs["input_ids"].shape[1]
        assert out.sequences[r, width:].tolist() == single.sequences[0, p:].tolist(), f"row {r}"
        assert out.forward_passes_per_row[r] == single.num_forward_passes
    assert len({int(n) for n in out.forward_passes_per_row}) > 1  # rows really finished at different steps


def test_a_mask_left_in_an_earlier_block_stays_out_of_cached_window_passes(confident):
    # Seed 21 of `_batch`: on row 2 (the 30x60 image prompt) the model writes the mask id itself at 3 positions of
    # the first block, which stay masks (as in the official loop). A cached pass of a later block runs only its
    # window: those columns have no logits there and must not be asked for (an IndexError before); each block's
    # full forward still offers them.
    _, singles, _ = _batch(confident, seed=21)
    settings = dict(
        steps=24,
        max_new_tokens=24,
        block_length=8,
        kv_cache="dual",
        kv_cache_prompt_refresh="once",
        confidence_threshold=0.4,
    )
    stop = _run(confident, singles[1], **settings).sequences[0, 4 + 10].item()
    assert stop == 3  # the draw that reproduces it
    passes = []
    out = _run(confident, singles[2], stop_token_ids=[[stop]], step_callback=passes.append, **settings)
    prompt = out.sequences.shape[1] - 24
    left = [p for p in passes if p.block == 1 and bool((p.positions < prompt + 8).any())]
    assert left, "the draw no longer leaves a mask in the first block"
    assert all(p.window[0] <= int(p.positions.min()) and int(p.positions.max()) < p.window[1] for p in passes)
    assert any(p.cache_refreshed for p in left) and not any(
        bool((p.positions < prompt + 8).any()) for p in passes if p.block == 1 and not p.cache_refreshed
    )


# ----------------------------------------------------------------------------------------------------------
# LM head shortlist


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lm_head_shortlist=0), r"lm_head_shortlist must be None or a positive integer, got 0"),
        (dict(lm_head_shortlist=2.5), r"lm_head_shortlist must be None or a positive integer, got 2.5"),
        (dict(lm_head_shortlist=True), r"lm_head_shortlist must be None or a positive integer, got True"),
        (dict(lm_head_shortlist=8, temperature=0.5), r"needs temperature=0 .*got temperature=0.5"),
        (dict(lm_head_shortlist=8, remasking="random"), r"needs temperature=0 and .*remasking='random'"),
    ],
)
def test_bad_lm_head_shortlist_raises_value_error_naming_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LladaVGenerationConfig(**kwargs)


def test_lm_head_shortlist_is_off_by_default_and_round_trips(tmp_path):
    assert LladaVGenerationConfig().lm_head_shortlist is None
    LladaVGenerationConfig(lm_head_shortlist=64).save_pretrained(tmp_path)
    assert LladaVGenerationConfig.from_pretrained(tmp_path).lm_head_shortlist == 64


def test_build_shortlist_takes_the_top_ids_of_candidate_columns_without_suppressed_ids():
    from llada_v.generation_utils import build_shortlist

    inf = float("-inf")
    logits = torch.tensor(
        [[[0.0, 5.0, 4.0, inf, 1.0], [9.0, 0.0, 0.0, 0.0, 8.0]], [[inf, inf, inf, 7.0, inf], [0.0, 0.0, 3.0, 2.0, 0.0]]]
    )  # (b=2, K=2, V=5)
    candidate = torch.tensor([[True, False], [True, True]])
    # row 0 col 0: ids 1, 2; row 0 col 1 is no candidate; row 1 col 0: only id 3 is finite; row 1 col 1: 2, 3
    assert build_shortlist(logits, candidate, 2).tolist() == [[-1, -1, 1, 2], [-1, 2, 3, -1]]  # 3 twice: once
    assert build_shortlist(logits, candidate, 1).tolist() == [[-1, 1], [2, 3]]
    assert build_shortlist(logits, candidate, 5).tolist() == [[-1] * 6 + [0, 1, 2, 4], [-1] * 4 + [0, 1, 2, 3, -1, 4]]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(kv_cache="dual"), dict(kv_cache="prefix", confidence_threshold=0.5), dict(cfg_scale=1.5)],
)
def test_lm_head_shortlist_of_the_whole_vocabulary_equals_the_full_lm_head(confident, options):
    inputs = _image_inputs(confident)
    settings = dict(MULTI_BLOCK, **options)
    full = _run(confident, inputs, **settings)
    vocab = confident.get_output_embeddings().weight.shape[0]
    _same(_run(confident, inputs, lm_head_shortlist=vocab, **settings), full)


def test_lm_head_shortlist_runs_later_passes_of_a_block_over_the_shortlist_only(confident):
    inputs = _image_inputs(confident)
    vocab = confident.get_output_embeddings().weight.shape[0]
    steps = []
    out = _run(confident, inputs, lm_head_shortlist=2, kv_cache="dual", step_callback=steps.append, **MULTI_BLOCK)
    assert len(steps) == 8 and out.num_forward_passes == 8
    shortlist = None
    for step in steps:
        if step.block_step == 0:  # the block's first pass: the whole vocabulary, the shortlist from its top 2
            assert step.logits.shape[-1] == vocab
            shortlist = set(step.logits[0].topk(2, dim=-1).indices.flatten().tolist())  # every column a candidate
            slots = 2 * step.positions.shape[0]
        else:
            assert step.logits.shape[-1] == slots < vocab
            assert int(torch.isfinite(step.logits[0, 0]).sum()) == len(shortlist)
            committed = step.tokens[0][step.committed[0]].tolist()
            assert set(committed) <= shortlist


@pytest.mark.slow
def test_lm_head_shortlist_batch_equals_single_runs(confident):
    batch, singles, width = _batch(confident)
    settings = dict(steps=24, max_new_tokens=24, block_length=8, kv_cache="dual", lm_head_shortlist=3)
    out = _run(confident, batch, **settings)
    for r, inputs in enumerate(singles):
        single = _run(confident, inputs, **settings)
        assert out.sequences[r, width:].tolist() == single.sequences[0, inputs["input_ids"].shape[1] :].tolist()
