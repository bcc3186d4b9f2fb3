"""Masked-diffusion denoising as a state that advances one forward pass at a time.

- `LladaVDenoisingRun`: the rows of one `diffusion_generate` call (built by `LladaVGenerationMixin.start_denoising`).
  `step()` runs the next pass; `diffusion_generate` calls it until the run is finished, then `finalize()`. A pass is
  three named parts, so that a driver can run the forward itself: `next_pass()` (blocks, finished rows, active rows
  and columns, the decoder window), `logits(pass)` (the run's own forward) and `apply(pass, logits, tokens)`
  (predictions, commits, stops, counters, `step_callback`).
- `LladaVDenoisingBatch`: runs that join (`add`) and leave (`remove`, or once finished) between passes. `step()`
  advances every run by one pass; the passes that are plain full forwards (no cache, guidance or shortlist) of all
  runs go through one decoder call, each run's rows left-padded to the longest canvas and the padding hidden from
  attention, as in a left-padded `diffusion_generate` batch, where a row gives what it gives alone
  (docs/generation.md). The other passes (key/value-cache refreshes and windows, dLLM-Cache, guidance, a
  shortlist) run in their own calls within the same step. The server's step scheduler drives one
  (`llada_v.serving.engine`).

The steps that need no model live here too: each row's candidates (`_candidates`), the one place that finishes
rows (`_finish_rows`), the rows and columns a pass runs (`_active`, `_inside`) and the stop search
(`_update_stops`). The rules of token choice and commit are `sampling_llada_v.DiffusionSampler`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache_llada_v import DecoderWindow, DecoderWindows
from .dllm_cache_llada_v import LladaVFeatureCache
from .sampling_llada_v import ClassifierFreeGuidance, DiffusionSampler, find_stop


@dataclass
class LladaVDiffusionStep:
    """What `step_callback` receives after every forward pass (for streaming or visualising the denoising).

    Attributes:
        step: 0-based index of the forward pass in this call.
        block, block_step: the block being decoded and the step inside it.
        rows: `(b,)` batch rows that took part in this pass (finished rows are left out).
        positions: `(K,)` canvas columns whose logits were computed.
        logits: `(b, K, V)` float32 logits at those columns (after guidance and suppression); `(b, K, S)` over
            each row's shortlist in the later passes of a block with `lm_head_shortlist`.
        tokens: `(b, K)` the predicted ids there.
        committed: `(b, K)` bool, which predictions were written to the canvas.
        canvas: `(B, length)` the whole canvas after this step (the live tensor: clone it to keep it).
        stop_indices: per row, the index in the answer region of the stop found so far, or None.
        window: `(start, end)` canvas columns the decoder ran on: `(0, length)` for a full forward, the current
            block (and with `kv_cache="prefix"` everything after it) for a cached step.
        cache_refreshed: whether this pass refreshed the key/value cache (`kv_cache` set, first pass of a block):
            a full forward, or with `kv_cache_prompt_refresh="once"` after the first block, the answer region and
            suffix (see `window`).
        prompt_length: columns of the (padded) prompt: the answer region starts there in `canvas`.
    """

    step: int
    block: int
    block_step: int
    rows: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor
    tokens: torch.Tensor
    committed: torch.Tensor
    canvas: torch.Tensor
    stop_indices: list[int | None]
    window: tuple[int, int] = (0, 0)
    cache_refreshed: bool = False
    prompt_length: int = 0


# ----------------------------------------------------------------------------------------------------------
# The state of one call and the steps that need no model


@dataclass
class _DenoisingState:
    """Everything one `diffusion_generate` call updates: the canvas of token ids (prompt | answer | suffix;
    masks are `mask_token_id`), each row's stop and whether it is finished, and the counters of the output."""

    canvas: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T): the prompt's padding, ones after it
    prompt_embeds: torch.Tensor  # (B, P, D), images merged, computed once
    prompt_len: int
    answer_len: int
    mask_token_id: int
    stop_index: list[int | None]  # per row, the stop's index in the answer region
    done: torch.Tensor  # (B,) bool
    passes_per_row: torch.Tensor  # (B,)
    columns: torch.Tensor  # (T,) 0..T-1
    num_passes: int = 0
    decoder_tokens: int = 0
    history: list[torch.Tensor] = field(default_factory=list)

    @property
    def answer_end(self) -> int:
        return self.prompt_len + self.answer_len

    @property
    def total_len(self) -> int:
        return self.canvas.shape[1]


@dataclass
class _Active:
    """The rows a pass runs and the columns whose logits it needs."""

    rows: torch.Tensor  # (b,) batch rows still decoding the block
    positions: torch.Tensor  # (K,) canvas columns that are a candidate in some row
    candidate: torch.Tensor  # (b, K) bool: the column can be committed in that row


def _candidates(state: _DenoisingState, block_end: int) -> torch.Tensor:
    """`(B, T)` bool: the columns each row may commit: masks of the answer before the block end, or before the
    row's stop once one is found."""
    is_mask = state.canvas == state.mask_token_id  # (B, T)
    columns = state.columns
    limit = torch.tensor(
        [block_end if s is None else state.prompt_len + s for s in state.stop_index], device=state.canvas.device
    )  # (B,)
    return is_mask & (columns >= state.prompt_len) & (columns[None, :] < limit[:, None])  # (B, T)


def _finish_rows(state: _DenoisingState, block_start: int, candidate: torch.Tensor | None = None) -> None:
    """The one place that marks rows finished (`state.done`). A row with a found stop is finished
    - at the start of a block (`candidate` None) when the block starts at or after its stop: a block after a
      found stop is never decoded (docs/parity.md Q15);
    - before a pass (`candidate` `(B, T)` from `_candidates`) when nothing before its stop is left to decode."""
    for row, stop in enumerate(state.stop_index):
        if stop is None:
            continue
        if candidate is None and state.prompt_len + stop <= block_start:
            state.done[row] = True
        elif candidate is not None and not bool(candidate[row].any()):
            state.done[row] = True


def _active(state: _DenoisingState, candidate: torch.Tensor, block_start: int, block_end: int) -> _Active | None:
    """The rows that are not finished and still have masks in the block, with the columns they may commit
    (`candidate` `(B, T)` from `_candidates`). None when no row steps."""
    is_mask = state.canvas[:, block_start:block_end] == state.mask_token_id  # (B, block_length)
    stepping = ~state.done & is_mask.any(-1)
    if not bool(stepping.any()):
        return None
    rows = stepping.nonzero().squeeze(1)
    positions = candidate[rows].any(0).nonzero().squeeze(1)
    return _Active(rows, positions, candidate[rows][:, positions])


def _inside(active: _Active, window: DecoderWindow, answer_start: int) -> _Active:
    """`active` without the columns before the pass's decoder window, which have no logits in it. Candidates end
    before the block's end, inside every window, so only a cached pass (its window starts after the answer's start)
    can leave any out, and only a mask that the model filled with the mask id itself (kept masked, as the official
    loop keeps it) in an earlier block: it stays a candidate of every pass that runs it (each block's full forward).
    Full forwards return at once (no host sync in exact mode)."""
    if window.start <= answer_start:
        return active
    inside = active.positions >= window.start  # (K,)
    if bool(inside.all()):
        return active
    return _Active(active.rows, active.positions[inside], active.candidate[:, inside])


def answer_length(stop_index: int | None, answer_len: int) -> int:
    """A row's answer tokens: up to its stop (the stop excluded), else the whole answer region."""
    return answer_len if stop_index is None else stop_index


def _update_stops(state: _DenoisingState, rows: torch.Tensor, stop_sequences: list[list[int]]) -> None:
    """Search each stepped row's answer region for the stop sequences (docs/parity.md Q15)."""
    if not stop_sequences:
        return
    for row in rows.tolist():
        answer = state.canvas[row, state.prompt_len : state.answer_end]
        state.stop_index[row] = find_stop(answer, stop_sequences, state.stop_index[row])


# ----------------------------------------------------------------------------------------------------------
# One call, one pass at a time


@dataclass
class DenoisingPass:
    """One planned forward pass of a run: its active rows and columns and its decoder window."""

    active: _Active
    window: DecoderWindow
    block: int
    block_step: int


class LladaVDenoisingRun:
    """The denoising of one `diffusion_generate` call, advanced one forward pass at a time.

    Built by `LladaVGenerationMixin.start_denoising` (the settings checked, the canvas built, the prompt and its
    images encoded). `step()` runs the next pass and returns False once the run is finished; `finalize()` returns
    what `diffusion_generate` returns. Blocks are decoded left to right in at most `steps_per_block` passes each;
    a block that starts after every row's stop is never decoded.
    """

    def __init__(
        self,
        model: Any,
        state: _DenoisingState,
        config: Any,
        stop_sequences: list[list[int]],
        suffix: list[int],
        windows: DecoderWindows,
        sampler: DiffusionSampler,
        feature_cache: LladaVFeatureCache | None = None,
        step_callback: Callable[[Any], None] | None = None,
    ):
        self.model, self.state, self.config = model, state, config
        self.stop_sequences, self.suffix = stop_sequences, suffix
        self.windows, self.sampler, self.feature_cache = windows, sampler, feature_cache
        self.step_callback = step_callback
        self.block, self.block_step = -1, 0
        self.block_over = True  # the first `next_pass` starts block 0
        self.finished = False
        self._planned: DenoisingPass | None = None

    @property
    def batch_size(self) -> int:
        return self.state.canvas.shape[0]

    def _block_bounds(self) -> tuple[int, int]:
        start = self.state.prompt_len + self.block * self.config.block_length
        return start, start + self.config.block_length

    def _next_block(self) -> bool:
        """Start the next block; False when there is none or every row is finished before it."""
        self.block += 1
        if self.block >= self.config.num_blocks:
            return False
        block_start, block_end = self._block_bounds()
        _finish_rows(self.state, block_start)
        if bool(self.state.done.all()):
            return False
        masks = (self.state.canvas[:, block_start:block_end] == self.config.mask_token_id).sum(-1)  # (B,)
        self.sampler.start_block(masks)
        self.windows.start_block()
        self.block_step, self.block_over = 0, False
        return True

    def next_pass(self) -> DenoisingPass | None:
        """The pass `step` runs next (planned once: calling again returns the same), or None once finished."""
        if self._planned is not None or self.finished:
            return self._planned
        state = self.state
        while True:
            if self.block_over or self.block_step >= self.config.steps_per_block:
                if not self._next_block():
                    self.finished = True
                    return None
            block_start, block_end = self._block_bounds()
            candidate = _candidates(state, block_end)  # (B, T)
            _finish_rows(state, block_start, candidate)
            active = _active(state, candidate, block_start, block_end)
            if active is None:
                self.block_over = True
                continue
            window = self.windows.plan(active.rows, block_start, block_end)
            if self.feature_cache is None:
                active = _inside(active, window, state.prompt_len)
            self._planned = DenoisingPass(active, window, self.block, self.block_step)
            return self._planned

    def shares_forward(self, planned: DenoisingPass) -> bool:
        """Whether the pass is a plain full forward, which `LladaVDenoisingBatch` runs together with other runs'."""
        return (
            self.feature_cache is None
            and planned.window.cache is None
            and not ClassifierFreeGuidance(self.config.cfg_scale).enabled
            and self.sampler.vocab_ids(planned.active.rows) is None
        )

    def logits(self, planned: DenoisingPass) -> tuple[torch.Tensor, int]:
        """The pass's own forward: logits `(b, K, V)` (`(b, K, S)` over a shortlist) and the decoder tokens."""
        state, active, window, config = self.state, planned.active, planned.window, self.config
        if self.feature_cache is not None:
            return self.model._feature_cached_logits(state, active, self.feature_cache, self.sampler)
        logits = self.model.diffusion_logits(
            state.canvas[active.rows],
            state.prompt_embeds[active.rows],
            active.positions,
            cfg_scale=config.cfg_scale,
            mask_token_id=config.mask_token_id,
            attention_mask=None if state.attention_mask is None else state.attention_mask[active.rows],
            cache=window.cache,
            window=(window.start, window.end),
            vocab_ids=self.sampler.vocab_ids(active.rows),
        )  # (b, K, V) float32, (b, K, S) over a shortlist
        copies = ClassifierFreeGuidance(config.cfg_scale).copies
        return logits, active.rows.shape[0] * copies * (window.end - window.start)

    def apply(self, planned: DenoisingPass, logits: torch.Tensor, decoder_tokens: int) -> None:
        """Predict, commit, count and search stops for the pass `planned` given its logits; call `step_callback`."""
        if planned is not self._planned:
            raise RuntimeError("apply() takes the pass that next_pass() planned, once")
        self._planned = None
        state, active, window = self.state, planned.active, planned.window
        tokens, confidence = self.sampler.predict(logits, active.rows, active.candidate)
        committed = self.sampler.commit(
            state.canvas, active.rows, active.positions, active.candidate, tokens, confidence, planned.block_step
        )
        state.num_passes += 1
        state.passes_per_row[active.rows] += 1
        state.decoder_tokens += decoder_tokens
        _update_stops(state, active.rows, self.stop_sequences)
        self.block_step += 1
        if self.config.output_history:
            state.history.append(state.canvas.clone())
        if self.step_callback is not None:
            self.step_callback(
                LladaVDiffusionStep(
                    step=state.num_passes - 1,
                    block=planned.block,
                    block_step=planned.block_step,
                    rows=active.rows,
                    positions=active.positions,
                    logits=logits,
                    tokens=tokens,
                    committed=committed,
                    canvas=state.canvas,
                    stop_indices=list(state.stop_index),
                    window=(window.start, window.end),
                    cache_refreshed=window.refreshed,
                    prompt_length=state.prompt_len,
                )
            )

    @torch.no_grad()
    def step(self) -> bool:
        """Run the next forward pass; False (and nothing run) once the run is finished."""
        planned = self.next_pass()
        if planned is None:
            return False
        self.apply(planned, *self.logits(planned))
        return True

    def finished_rows(self) -> set[int]:
        """The rows that will change no more (one host read): all once the run is finished, else those finished
        (stop found and decoded) or dropped."""
        if self.finished:
            return set(range(self.batch_size))
        return set(self.state.done.nonzero().flatten().tolist())

    def row_answer_ids(self, row: int) -> list[int]:
        """Row `row`'s answer ids up to its stop, as `finalize().answer_ids()[row]` (final once in `finished_rows`)."""
        state = self.state
        n = answer_length(state.stop_index[row], state.answer_len)
        return state.canvas[row, state.prompt_len : state.prompt_len + n].tolist()

    def drop_row(self, row: int) -> None:
        """Row `row` takes no further pass, the planned one included (its client went away); the other rows are
        unchanged. Its cache rows (`kv_cache`) are dropped as those of a finished row."""
        self.state.done[row] = True
        planned = self._planned
        if planned is None or not bool((planned.active.rows == row).any()):
            return
        keep = planned.active.rows != row
        if not bool(keep.any()):
            self._planned = None  # nothing left to run in this pass: planned again, without the row
            return
        rows = planned.active.rows[keep]
        self.windows.restrict(rows)
        window = DecoderWindow(planned.window.start, planned.window.end, self.windows.cache, planned.window.refreshed)
        active = _Active(rows, planned.active.positions, planned.active.candidate[keep])
        self._planned = DenoisingPass(active, window, planned.block, planned.block_step)

    def finalize(self) -> Any:
        """What `diffusion_generate` returns: the sequences, or a `LladaVGenerateOutput`."""
        return self.model._finalize(self.state, self.suffix, self.config)


# ----------------------------------------------------------------------------------------------------------
# Runs that join and leave between passes


@dataclass
class BatchStep:
    """What one `LladaVDenoisingBatch.step` did: the runs that finished (removed from the batch), the rows of each
    decoder call, and the runs that stepped."""

    finished: list[LladaVDenoisingRun]
    forward_rows: list[int]
    stepped: int


class LladaVDenoisingBatch:
    """Runs of one model that join (`add`) and leave (`remove`, or once finished) between passes.

    `step()` advances every run by one pass: the plain full-forward passes of all runs share one decoder call
    (`LladaVGenerationMixin.shared_logits`), the others run their own. At temperature 0 each run gives what it gives
    alone: its rows see only their own tokens, at their own positions (the padding is hidden from attention).
    """

    def __init__(self, model: Any):
        self.model = model
        self.runs: list[LladaVDenoisingRun] = []

    def __len__(self) -> int:
        return len(self.runs)

    def add(self, run: LladaVDenoisingRun) -> None:
        if run.model is not self.model:
            raise ValueError("a run joins the batch of the model that started it")
        self.runs.append(run)

    def remove(self, run: LladaVDenoisingRun) -> None:
        """Take `run` out (e.g. its client went away); its state stays as it is."""
        self.runs = [r for r in self.runs if r is not run]

    @torch.no_grad()
    def step(self) -> BatchStep:
        """One pass of every run that has one; finished runs leave the batch and are returned."""
        finished, planned, shared, own = [], [], [], []
        for run in self.runs:
            p = run.next_pass()
            if p is None:
                finished.append(run)
            else:
                planned.append((run, p))
                (shared if run.shares_forward(p) else own).append((run, p))
        forward_rows = []
        if shared:
            parts = [(run.state, p.active) for run, p in shared]
            for (run, p), logits in zip(shared, self.model.shared_logits(parts)):
                tokens = p.active.rows.shape[0] * (p.window.end - p.window.start)
                run.apply(p, logits, tokens)
            forward_rows.append(sum(p.active.rows.shape[0] for _, p in shared))
        for run, p in own:
            run.apply(p, *run.logits(p))
            forward_rows.append(p.active.rows.shape[0])
        # Plan the next passes now: a run with none left is finished and leaves at once.
        finished += [run for run, _ in planned if run.next_pass() is None]
        gone = {id(run) for run in finished}
        self.runs = [run for run in self.runs if id(run) not in gone]
        return BatchStep(finished, forward_rows, len(planned))


__all__ = [
    "BatchStep",
    "DenoisingPass",
    "LladaVDenoisingBatch",
    "LladaVDenoisingRun",
    "LladaVDiffusionStep",
    "answer_length",
]
