"""The sampler's decoding rules, testable without a model.

Small functions on tensors: the transfer schedule, the token choice (argmax or float64 Gumbel-max), top-k /
top-p filtering, the confidence of a choice, the per-row top-k commit, the stop-sequence search and the LM-head
shortlist. Two small owners use them: `DiffusionSampler` (token choice, confidence and commit of one call: a new
decoding rule changes that class) and `ClassifierFreeGuidance` (the batch layout of a guided forward). The loop
that calls them is `generation_utils.LladaVGenerationMixin.diffusion_generate` (docs/generation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .generation_config_llada_v import REMASKING_STRATEGIES

# Largest float64 block (in elements) the Gumbel noise and the softmax are computed on at once (64 MiB).
_FLOAT64_CHUNK_ELEMENTS = 1 << 23


def transfer_schedule(mask_counts: torch.Tensor | int, steps: int) -> torch.Tensor:
    """Tokens to commit at each step of a block: `m // steps` each, plus one for the first `m % steps` steps.

    Args:
        mask_counts: masks per row at the start of the block, `(B,)` (an int gives one row).
        steps: steps of the block.

    Returns:
        `(B, steps)` int64.
    """
    counts = torch.as_tensor(mask_counts, dtype=torch.long).reshape(-1)
    base = (counts // steps)[:, None].expand(-1, steps)
    extra = torch.arange(steps, device=counts.device)[None, :] < (counts % steps)[:, None]
    return base + extra.long()


def sample_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The official token choice on `(N, V)` logits: argmax at temperature 0, else Gumbel-max in float64,
    `argmax(exp(logits) / (-log u) ** temperature)` with `u ~ U(0, 1)`.

    The float64 noise is drawn in chunks of rows, so memory stays bounded whatever N is.
    """
    if temperature == 0:
        return logits.argmax(-1)
    vocab = logits.shape[-1]
    chunk = max(1, _FLOAT64_CHUNK_ELEMENTS // vocab)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk].to(torch.float64)
        u = torch.rand(part.shape, dtype=torch.float64, device=part.device, generator=generator)
        gumbel = -torch.log(u)
        scores = part.exp() / gumbel**temperature
        choice = scores.argmax(-1)
        # The official form overflows or underflows for large logits or temperatures (inf / inf, or every
        # score 0, where argmax would pick a suppressed id); the same argmax in log space is safe there.
        unsafe = ~(torch.isfinite(scores).all(-1) & (scores.amax(-1) > 0))
        if bool(unsafe.any()):
            log_scores = part - temperature * torch.log(gumbel)
            choice = torch.where(unsafe, log_scores.argmax(-1), choice)
        out[start : start + chunk] = choice
    return out


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """`(N, V)` logits with every id outside the `top_k` most likely and outside the smallest set of
    probability mass >= `top_p` set to -inf (in place; ties at the k-th value are kept)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.to(torch.float64), dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely ids
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, before >= top_p)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def token_confidence(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    remasking: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Confidence of each chosen token, `(N,)` float64: its softmax probability computed in float64
    (`"low_confidence"`, in chunks of rows) or a uniform random number (`"random"`)."""
    if remasking == "random":
        return torch.rand(tokens.shape, dtype=torch.float64, device=tokens.device, generator=generator)
    if remasking != "low_confidence":
        raise ValueError(f"remasking must be one of {REMASKING_STRATEGIES}, got {remasking!r}")
    vocab = logits.shape[-1]
    chunk = max(1, _FLOAT64_CHUNK_ELEMENTS // vocab)
    out = torch.empty(tokens.shape, dtype=torch.float64, device=tokens.device)
    for start in range(0, logits.shape[0], chunk):
        probs = torch.softmax(logits[start : start + chunk].to(torch.float64), dim=-1)
        out[start : start + chunk] = probs.gather(-1, tokens[start : start + chunk, None]).squeeze(-1)
    return out


def select_top_k(confidence: torch.Tensor, k: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Per row, mark the `k[row]` most confident entries of `confidence` `(B, K)`; -inf entries are never
    chosen (fewer are taken when fewer are finite). Returns a bool `(B, K)` tensor."""
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1).tolist()
    if len(k) != confidence.shape[0]:
        raise ValueError(f"k has {len(k)} entries for {confidence.shape[0]} rows")
    chosen = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    available = (confidence > float("-inf")).sum(-1).tolist()
    for row, (k_row, n_row) in enumerate(zip(k, available)):
        take = min(k_row, n_row)
        if take > 0:
            chosen[row, torch.topk(confidence[row], take).indices] = True
    return chosen


def find_stop(
    generated: torch.Tensor, stop_sequences: Sequence[Sequence[int]], stop_index: int | None = None
) -> int | None:
    """The official stop search over the answer region (docs/parity.md Q15), run after every step.

    Criteria are tried in order; a criterion's earliest occurrence becomes the stop if none was found yet or
    it is earlier than the current one. As soon as a stop is known (from this call or an earlier step), the
    remaining criteria are not checked, so after the first find only the first criterion is re-checked.

    Args:
        generated: `(G,)` ids of the answer region (masks included).
        stop_sequences: non-empty id sequences.
        stop_index: the stop found so far (index into `generated`) or None.

    Returns:
        The updated stop index, or None.
    """
    for seq in stop_sequences:
        length = len(seq)
        if 0 < length <= generated.shape[0]:
            windows = generated.unfold(0, length, 1)  # (G - length + 1, length)
            target = torch.as_tensor(seq, dtype=generated.dtype, device=generated.device)
            hits = (windows == target).all(-1).nonzero()
            if hits.numel():
                first = int(hits[0, 0])
                if stop_index is None or first < stop_index:
                    stop_index = first
        if stop_index is not None:
            break
    return stop_index


def build_shortlist(logits: torch.Tensor, candidate: torch.Tensor, size: int) -> torch.Tensor:
    """Each row's LM-head shortlist for the rest of the block (`lm_head_shortlist`): the ids among the `size`
    likeliest of any of its candidate columns, from `(b, K, V)` logits whose suppressed ids are already -inf
    (left out) and the `(b, K)` bool candidates. Per row, so a row's result does not depend on its batch.

    Returns `(b, K * size)` int64: ids in increasing order, -1 in the unused slots (repeats, -inf ids, other
    columns).
    """
    top = logits.topk(min(size, logits.shape[-1]), dim=-1)  # (b, K, size)
    keep = (top.values > float("-inf")) & candidate[..., None]
    ids = torch.where(keep, top.indices, -1).flatten(1).sort(dim=-1).values  # (b, K * size)
    repeated = torch.zeros_like(ids, dtype=torch.bool)
    repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeated, -1)


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Classifier-free guidance (`cfg_scale`, docs/parity.md Q17): the one owner of its batch layout. A guided
    forward runs the conditional rows first, then their unconditional copies (every prompt position masked) in
    the same order, and combines the two halves' logits as `un + (scale + 1) * (cond - un)`."""

    scale: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.scale > 0

    @property
    def copies(self) -> int:
        """Forward rows per canvas row."""
        return 2 if self.enabled else 1

    def double(self, conditional: torch.Tensor, unconditional: torch.Tensor | None = None) -> torch.Tensor:
        """`(b, ...)` -> `(2b, ...)` when guided: `conditional`, then `unconditional` (default: the same rows)."""
        if not self.enabled:
            return conditional
        return torch.cat((conditional, conditional if unconditional is None else unconditional), dim=0)

    def rows(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        """Indices of canvas rows in a batch of `batch` -> their indices in the guided `2 * batch` forward rows
        (both copies), e.g. to keep a key/value cache's rows."""
        if not self.enabled:
            return rows
        return torch.cat((rows, rows + batch))

    def combine(self, logits: torch.Tensor) -> torch.Tensor:
        """The `(2b, ...)` logits of a guided forward -> `(b, ...)` guided logits."""
        if not self.enabled:
            return logits
        cond, uncond = logits.chunk(2, dim=0)
        return uncond + (self.scale + 1) * (cond - uncond)


class DiffusionSampler:
    """Token choice, confidence and commit for one `diffusion_generate` call: the decoding rules in one class
    (as transformers' DiffusionGemma keeps them in its sampler), so a new rule changes this class only.

    Per block, `start_block` takes each row's mask count (the transfer schedule) and forgets the shortlist;
    per pass, `vocab_ids` gives the ids the forward computes logits over (`lm_head_shortlist`, else None),
    `predict` the token and its confidence at every column, and `commit` writes the chosen predictions.

    Args:
        config: the call's `LladaVGenerationConfig` (validated): `temperature`, `top_k`, `top_p`, `remasking`,
            `tokenizer_vocab_size`, `confidence_threshold`, `lm_head_shortlist`, `steps_per_block`.
        suppress: `(n,)` ids whose logits are -inf at mask positions (`suppress_tokens` and one-token
            `bad_words_ids`).
        batch: rows of the canvas.
        generator: random source for `temperature > 0` and `"random"` remasking.
    """

    def __init__(self, config: Any, suppress: torch.Tensor, batch: int, generator: torch.Generator | None = None):
        self.temperature, self.top_k, self.top_p = config.temperature, config.top_k, config.top_p
        self.remasking, self.vocab_limit = config.remasking, config.tokenizer_vocab_size
        self.threshold, self.shortlist_size = config.confidence_threshold, config.lm_head_shortlist
        self.steps_per_block = config.steps_per_block
        self.suppress, self.batch, self.generator = suppress, batch, generator
        self.schedule: torch.Tensor | None = None  # (B, steps_per_block) tokens to commit per step
        self.shortlist: torch.Tensor | None = None  # (B, S) ids, built by a block's first pass

    def start_block(self, mask_counts: torch.Tensor) -> None:
        """`mask_counts` `(B,)`: each row's masks in the block at its start."""
        self.schedule = transfer_schedule(mask_counts, self.steps_per_block)  # (B, steps_per_block)
        self.shortlist = None

    def vocab_ids(self, rows: torch.Tensor) -> torch.Tensor | None:
        """`(b, S)` the shortlist of these rows (-1 unused), or None: logits over the whole vocabulary."""
        return None if self.shortlist is None else self.shortlist[rows]

    def predict(
        self, logits: torch.Tensor, rows: torch.Tensor, candidate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Suppress ids in `logits` `(b, K, V)` in place, then the token choice and its confidence at every
        column, `(b, K)` each. With a shortlist the logits are `(b, K, S)` over each row's ids (`vocab_ids`).
        A block's first pass builds the shortlist from its logits (`lm_head_shortlist`; `candidate` `(b, K)`)."""
        shortlist = self.vocab_ids(rows)
        if shortlist is None:
            tokens, confidence = self._predict(logits)
        else:
            tokens, confidence = self._predict_in_shortlist(logits, shortlist)
        if self.shortlist_size is not None and self.shortlist is None:
            built = build_shortlist(logits, candidate, self.shortlist_size)  # (b, S)
            self.shortlist = built.new_full((self.batch, built.shape[1]), -1)  # (B, S)
            self.shortlist.index_copy_(0, rows, built)  # rows not stepping now are done for the block
        return tokens, confidence

    def _predict(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits[..., self.suppress] = float("-inf")
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            logits[..., self.vocab_limit :] = float("-inf")
        b, k_cols, vocab = logits.shape
        flat = logits.reshape(b * k_cols, vocab)
        if self.temperature > 0 and (self.top_k is not None or self.top_p is not None):
            filter_top_k_top_p(flat, self.top_k, self.top_p)
        tokens = sample_tokens(flat, self.temperature, self.generator).view(b, k_cols)
        confidence = token_confidence(flat, tokens.view(-1), self.remasking, self.generator).view(b, k_cols)
        return tokens, confidence

    def _predict_in_shortlist(self, logits: torch.Tensor, shortlist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shortlist holds no suppressed id (see `build_shortlist`; unused slots are -inf): the choice is
        mapped back to vocabulary ids."""
        b, k_cols, size = logits.shape
        flat = logits.reshape(b * k_cols, size)
        local = flat.argmax(-1)  # temperature 0 (checked by the config)
        confidence = token_confidence(flat, local, self.remasking, self.generator).view(b, k_cols)
        tokens = shortlist.gather(1, local.view(b, k_cols))
        return tokens, confidence.masked_fill(tokens < 0, float("-inf"))  # an empty shortlist commits nothing

    def commit(
        self,
        canvas: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        candidate: torch.Tensor,
        tokens: torch.Tensor,
        confidence: torch.Tensor,
        block_step: int,
    ) -> torch.Tensor:
        """Write into `canvas` `(B, T)`, at `rows` `(b,)` x `positions` `(K,)`, each row's scheduled number of
        most confident candidates (`candidate` `(b, K)`) and, with `confidence_threshold`, every candidate above
        it. Returns which predictions were committed, `(b, K)`."""
        confidence = confidence.masked_fill(~candidate, float("-inf"))
        committed = select_top_k(confidence, self.schedule[rows, block_step])
        if self.threshold is not None:
            committed |= confidence > self.threshold  # parallel decoding: -inf (non-candidates) never passes
        previous = canvas[rows][:, positions]
        canvas[rows[:, None], positions[None, :]] = torch.where(committed, tokens, previous)
        return committed


__all__ = [
    "ClassifierFreeGuidance",
    "DiffusionSampler",
    "build_shortlist",
    "filter_top_k_top_p",
    "find_stop",
    "sample_tokens",
    "select_top_k",
    "token_confidence",
    "transfer_schedule",
]
