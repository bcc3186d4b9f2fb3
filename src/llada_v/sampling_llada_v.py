"""The sampler's pure maths: small functions on tensors, testable without a model.

The transfer schedule, the token choice (argmax or float64 Gumbel-max), top-k / top-p filtering, the confidence
of a choice, the per-row top-k commit, the stop-sequence search and the LM-head shortlist. The loop that calls
them is `generation_utils.LladaVGenerationMixin.diffusion_generate` (docs/generation.md).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
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


__all__ = [
    "build_shortlist",
    "filter_top_k_top_p",
    "find_stop",
    "sample_tokens",
    "select_top_k",
    "token_confidence",
    "transfer_schedule",
]
