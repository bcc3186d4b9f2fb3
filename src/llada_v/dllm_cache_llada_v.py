"""dLLM-Cache for LLaDA-V: the feature cache the released demo runs with by default (docs/generation.md).

A masked-diffusion step changes a few answer tokens; the features of the prompt barely move and those of the
answer move slowly. dLLM-Cache keeps, per decoder layer, the prompt's and the answer's keys and values (before
RoPE), attention outputs (after `o_proj`) and MLP outputs, and refreshes them on two clocks. For a row's pass
number `n` (1-based, counted over the passes that row took part in during one call):

- the prompt is recomputed when `(n - 1) % prompt_interval_steps == 0`;
- the answer region (answer and suffix) is recomputed when `(n - 1) % gen_interval_steps == 0`;
- otherwise the `transfer_ratio` share of answer positions whose value vectors changed most since they were
  cached (lowest cosine similarity, per row) is recomputed and written into the cache; the rest is reused.

Pass 1 refreshes both, so it is a full forward. This module holds the settings, the storage, the refresh
clocks, the token choice and the layer under the cache (`feature_cached_layer_forward`, called by
`LladaVDecoderLayer`); the attention maths is `feature_cache_attention` in modeling_llada_v.py.

It reproduces the official implementation (LLaDA-V's `dLLMCache` + `register_cache_LLaDA_V`) id for id,
including its numerics: RoPE from a float32 table indexed by position and attention computed as
`softmax(q k^T / sqrt(d))` in eager form. It is an approximation of exact decoding: answers change.
Differences by design: the cache is an object passed through the forward (no global singleton, no patched
methods), and each row of a batch keeps its own clock and picks its own tokens, so a left-padded batch gives
what each row gives alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

# The official names and the released demo's values (`generate_demo.py`): prompt every 25 passes, answer every 7,
# a quarter of the answer recomputed in between.
DLLM_CACHE_DEFAULTS: dict[str, Any] = {"prompt_interval_steps": 25, "gen_interval_steps": 7, "transfer_ratio": 0.25}

# Storage names, per layer: keys/values before RoPE, attention output after o_proj, MLP output after down_proj.
FEATURES = ("k", "v", "attn", "mlp")


def dllm_cache_settings(value: Any) -> dict[str, Any] | None:
    """The dLLM-Cache settings from a `LladaVGenerationConfig.dllm_cache` value: None (off), or a dict with any of
    `prompt_interval_steps`, `gen_interval_steps` (positive ints) and `transfer_ratio` (a number in [0, 1]; 0
    recomputes nothing between refreshes); the missing ones take the official defaults (25, 7, 0.25). Raises
    `ValueError` naming unknown keys and bad values."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(
            f"dllm_cache must be None or a dict of {sorted(DLLM_CACHE_DEFAULTS)} ({{}} = the official defaults "
            f"25/7/0.25), got {value!r}"
        )
    unknown = sorted(set(value) - set(DLLM_CACHE_DEFAULTS))
    if unknown:
        raise ValueError(f"dllm_cache got unknown keys {unknown}; its settings are {sorted(DLLM_CACHE_DEFAULTS)}")
    settings = {**DLLM_CACHE_DEFAULTS, **value}
    for name in ("prompt_interval_steps", "gen_interval_steps"):
        step = settings[name]
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ValueError(f"dllm_cache {name} must be a positive integer, got {step!r}")
    ratio = settings["transfer_ratio"]
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        raise ValueError(f"dllm_cache transfer_ratio must be a number in [0, 1], got {ratio!r}")
    return settings


def transfer_index(new_values: torch.Tensor, cached_values: torch.Tensor, transfer_ratio: float) -> torch.Tensor:
    """The answer positions to recompute between refreshes: per row, the `int(G * transfer_ratio)` positions whose
    value vectors `(b, G, d)` are least cosine-similar to the cached ones, least similar first. `(b, k)` int64."""
    batch, length = new_values.shape[:2]
    k = int(length * transfer_ratio) if 0 < transfer_ratio <= 1 else 0
    if k == 0:
        return torch.empty((batch, 0), dtype=torch.long, device=new_values.device)
    similarity = torch.nn.functional.cosine_similarity(new_values, cached_values, dim=-1)  # (b, G)
    return torch.topk(similarity, k=k, largest=False).indices


def rope_table(inv_freq: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin table `(length, head_dim)` float32 of positions `0..length-1`, computed as the official cache
    hook does (an outer product of float32 positions and frequencies), indexed by position afterwards."""
    t = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class FeaturePositions(NamedTuple):
    """What every layer of a feature-cached forward needs besides the cache: the RoPE table (see `rope_table`),
    each row's positions `(b, T)` and which keys are real tokens `(b, T)` bool (None: no padding)."""

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor
    key_padding: torch.Tensor | None


class LladaVFeatureCache:
    """The dLLM-Cache of one `diffusion_generate` call: every layer's cached features for every row of the batch.

    A pass runs its rows in groups that share the same refresh decision (`groups`); each group's forward gets a
    `FeatureCacheView`, which reads and writes only its rows. Rows keep their place for the whole call (rows that
    finished simply stop being read).

    Args:
        settings: `dllm_cache_settings(...)` output.
        batch_size: rows of the canvas.
        num_layers: decoder layers.
        prompt_length: columns of the (left-padded) prompt; the answer region is everything after it.
    """

    def __init__(self, settings: dict[str, Any], batch_size: int, num_layers: int, prompt_length: int):
        self.prompt_interval = settings["prompt_interval_steps"]
        self.gen_interval = settings["gen_interval_steps"]
        self.transfer_ratio = float(settings["transfer_ratio"])
        self.batch_size, self.prompt_length = batch_size, prompt_length
        self.store: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

    def refresh(self, pass_number: int) -> tuple[bool, bool]:
        """(prompt refreshed, answer refreshed) at a row's `pass_number`-th pass (1-based)."""
        return (pass_number - 1) % self.prompt_interval == 0, (pass_number - 1) % self.gen_interval == 0

    def groups(self, rows: torch.Tensor, passes_done: torch.Tensor) -> list[tuple[torch.Tensor, FeatureCacheView]]:
        """Split a pass's batch rows `(b,)` (with the passes each took part in so far, `(b,)`) into groups with one
        refresh decision: `[(index into rows, view)]`, in order of first appearance."""
        decisions = [self.refresh(int(n) + 1) for n in passes_done.tolist()]
        out = []
        for decision in dict.fromkeys(decisions):
            index = torch.tensor([i for i, d in enumerate(decisions) if d == decision], device=rows.device)
            chosen = rows[index]
            whole = chosen.shape[0] == self.batch_size and bool(
                (chosen == torch.arange(self.batch_size, device=rows.device)).all()
            )
            out.append((index, FeatureCacheView(self, None if whole else chosen, *decision)))
        return out

    def num_transfer(self, answer_length: int) -> int:
        """Answer positions recomputed per row in a pass that does not refresh the answer."""
        return int(answer_length * self.transfer_ratio) if 0 < self.transfer_ratio <= 1 else 0


class FeatureCacheView:
    """One group's access to a `LladaVFeatureCache`: its rows (None: all rows, in order) and its refresh decision.

    Features are stored per layer under `"prompt_<name>"` / `"answer_<name>"` for the names in `FEATURES`."""

    def __init__(
        self, cache: LladaVFeatureCache, rows: torch.Tensor | None, refresh_prompt: bool, refresh_answer: bool
    ):
        self.cache, self.rows = cache, rows
        self.refresh_prompt, self.refresh_answer = refresh_prompt, refresh_answer

    @property
    def prompt_length(self) -> int:
        return self.cache.prompt_length

    @property
    def transfer_ratio(self) -> float:
        return self.cache.transfer_ratio

    def get(self, layer: int, name: str) -> torch.Tensor:
        stored = self.cache.store[layer].get(name)
        if stored is None:
            raise RuntimeError(f"dLLM-Cache: layer {layer} has no {name!r} yet (the first pass must refresh both)")
        return stored if self.rows is None else stored[self.rows]

    def set(self, layer: int, name: str, value: torch.Tensor) -> None:
        store = self.cache.store[layer]
        if self.rows is None:
            store[name] = value
            return
        if name not in store:
            raise RuntimeError(
                f"dLLM-Cache: layer {layer} has no {name!r} to update (the first pass must refresh both)"
            )
        store[name].index_copy_(0, self.rows, value.to(store[name].dtype))

    def decoder_tokens(self, total_length: int) -> int:
        """Query positions per row that go through attention and the MLP in this group's pass (the value
        projection of the answer, needed to pick the recomputed positions, is not counted)."""
        answer = total_length - self.prompt_length
        moved = self.cache.num_transfer(answer)
        if self.refresh_prompt:
            return total_length if self.refresh_answer else self.prompt_length + moved
        return answer if self.refresh_answer else moved


# ----------------------------------------------------------------------------------------------------------
# The layer with the cache: what a group's refresh decision recomputes is computed, the rest read from the cache.
# `layer` is a `LladaVDecoderLayer` (its norms, projections and MLP are used); `attend(q, k, v, q_positions,
# features)` is the attention after o_proj with the official hook's numerics (`feature_cache_attention` in
# modeling_llada_v.py). Follows the official cache hook op for op, so the ids equal the official ones.

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, FeaturePositions], torch.Tensor]


def feature_cached_layer_forward(
    layer: Any, x: torch.Tensor, cache: FeatureCacheView, features: FeaturePositions, attend: Attend
) -> torch.Tensor:
    """One decoder layer on the whole canvas `(b, T, D)` under dLLM-Cache; returns its output `(b, T, D)`."""
    index, p = layer.self_attn.layer_idx, cache.prompt_length
    if cache.refresh_prompt and cache.refresh_answer:  # a full layer, everything stored
        q, k, v = _project(layer, x)
        for name, value in (("k", k), ("v", v)):
            cache.set(index, f"prompt_{name}", value[:, :p])
            cache.set(index, f"answer_{name}", value[:, p:])
        attn = attend(q, k, v, features.positions, features)
        cache.set(index, "prompt_attn", attn[:, :p])
        cache.set(index, "answer_attn", attn[:, p:])
        h = x + attn
        mlp = layer.mlp(layer.post_attention_layernorm(h))
        cache.set(index, "prompt_mlp", mlp[:, :p])
        cache.set(index, "answer_mlp", mlp[:, p:])
        return h + mlp
    if cache.refresh_answer:
        return _answer_refresh(layer, x, cache, features, attend)
    return _transfer(layer, x, cache, features, attend)


def _project(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    normed = layer.input_layernorm(x)
    attn = layer.self_attn
    return attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)


def _answer_refresh(
    layer: Any, x: torch.Tensor, cache: FeatureCacheView, features: FeaturePositions, attend: Attend
) -> torch.Tensor:
    """The answer region recomputed against the cached prompt keys/values; the prompt's outputs reused."""
    index, p = layer.self_attn.layer_idx, cache.prompt_length
    q_a, k_a, v_a = _project(layer, x[:, p:])
    cache.set(index, "answer_k", k_a)
    cache.set(index, "answer_v", v_a)
    k = torch.cat((cache.get(index, "prompt_k"), k_a), dim=1)
    v = torch.cat((cache.get(index, "prompt_v"), v_a), dim=1)
    attn_a = attend(q_a, k, v, features.positions[:, p:], features)
    cache.set(index, "answer_attn", attn_a)
    h = x + torch.cat((cache.get(index, "prompt_attn"), attn_a), dim=1)
    mlp_a = layer.mlp(layer.post_attention_layernorm(h[:, p:]))
    cache.set(index, "answer_mlp", mlp_a)
    return h + torch.cat((cache.get(index, "prompt_mlp"), mlp_a), dim=1)


def _transfer(
    layer: Any, x: torch.Tensor, cache: FeatureCacheView, features: FeaturePositions, attend: Attend
) -> torch.Tensor:
    """No answer refresh: the `transfer_ratio` share of answer positions whose values moved most is recomputed
    (per row) and written into the cache; with a prompt refresh the prompt is recomputed too, its queries in the
    same attention call as the moved positions' (the official order)."""
    index, p = layer.self_attn.layer_idx, cache.prompt_length
    projections = layer.self_attn
    k_a, v_a = cache.get(index, "answer_k"), cache.get(index, "answer_v")
    attn_a = cache.get(index, "answer_attn")
    moved = None  # (b, n) answer indices recomputed in this pass
    queries, q_positions = [], []
    if cache.refresh_prompt:
        q_p, k_p, v_p = _project(layer, x[:, :p])
        cache.set(index, "prompt_k", k_p)
        cache.set(index, "prompt_v", v_p)
        queries.append(q_p)
        q_positions.append(features.positions[:, :p])
    else:
        k_p, v_p = cache.get(index, "prompt_k"), cache.get(index, "prompt_v")
    if x.shape[1] > p:
        normed_a = layer.input_layernorm(x[:, p:])  # (b, G, D)
        moved = transfer_index(projections.v_proj(normed_a), v_a, cache.transfer_ratio)
        if moved.numel() == 0:
            moved = None
    if moved is not None:
        chosen = _gather_rows(normed_a, moved)  # (b, n, D)
        q_m, k_m, v_m = projections.q_proj(chosen), projections.k_proj(chosen), projections.v_proj(chosen)
        k_a, v_a = _scatter_rows(k_a, moved, k_m), _scatter_rows(v_a, moved, v_m)
        cache.set(index, "answer_k", k_a)
        cache.set(index, "answer_v", v_a)
        queries.append(q_m)
        q_positions.append(features.positions[:, p:].gather(1, moved))
    attn_p = None if cache.refresh_prompt else cache.get(index, "prompt_attn")
    if queries:
        k, v = torch.cat((k_p, k_a), dim=1), torch.cat((v_p, v_a), dim=1)
        out = attend(torch.cat(queries, dim=1), k, v, torch.cat(q_positions, dim=1), features)
        if cache.refresh_prompt:
            attn_p = out[:, :p]
            cache.set(index, "prompt_attn", attn_p)
        if moved is not None:
            attn_a = _scatter_rows(attn_a, moved, out[:, out.shape[1] - moved.shape[1] :])
            cache.set(index, "answer_attn", attn_a)
    h = x + torch.cat((attn_p, attn_a), dim=1)
    mlp_a = cache.get(index, "answer_mlp")
    mlp_inputs = [h[:, :p]] if cache.refresh_prompt else []
    if moved is not None:
        mlp_inputs.append(_gather_rows(h[:, p:], moved))
    mlp_p = None if cache.refresh_prompt else cache.get(index, "prompt_mlp")
    if mlp_inputs:
        out = layer.mlp(layer.post_attention_layernorm(torch.cat(mlp_inputs, dim=1)))
        if cache.refresh_prompt:
            mlp_p = out[:, :p]
            cache.set(index, "prompt_mlp", mlp_p)
        if moved is not None:
            mlp_a = _scatter_rows(mlp_a, moved, out[:, out.shape[1] - moved.shape[1] :])
            cache.set(index, "answer_mlp", mlp_a)
    return h + torch.cat((mlp_p, mlp_a), dim=1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, index[b, i]]`: `(b, G, d)`, `(b, n)` -> `(b, n, d)`."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of `x` `(b, G, d)` with `x[b, index[b, i]] = src[b, i]`."""
    return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), src)


__all__ = [
    "DLLM_CACHE_DEFAULTS",
    "FeatureCacheView",
    "FeaturePositions",
    "LladaVFeatureCache",
    "dllm_cache_settings",
    "feature_cached_layer_forward",
    "rope_table",
    "transfer_index",
]
