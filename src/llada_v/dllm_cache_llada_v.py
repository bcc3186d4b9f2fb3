"""dLLM-Cache for LLaDA-V: the feature cache the released demo runs with by default (docs/generation.md).

A masked-diffusion step changes a few answer tokens; the features of the prompt barely move and those of the
answer move slowly. dLLM-Cache keeps, per decoder layer, the prompt's and the answer's keys and values (before
RoPE), attention outputs (after `o_proj`) and MLP outputs, and refreshes them on two clocks. For a row's pass
number `n` (1-based, counted over the passes that row took part in during one call):

- the prompt is recomputed when `(n - 1) % prompt_interval_steps == 0`;
- the answer region (answer and suffix) is recomputed when `(n - 1) % gen_interval_steps == 0`;
- otherwise the `transfer_ratio` share of answer positions whose value vectors changed most since they were
  cached (lowest cosine similarity, per row) is recomputed and written into the cache; the rest is reused.

Pass 1 refreshes both, so it is a full forward. The decoder layer applies this in
`LladaVDecoderLayer.forward_feature_cached` (modeling_llada_v.py); this module holds the settings, the storage,
the refresh clocks and the pure token choice. It reproduces the official implementation (LLaDA-V's
`dLLMCache` + `register_cache_LLaDA_V`) id for id, including its numerics: RoPE from a float32 table indexed
by position and attention computed as `softmax(q k^T / sqrt(d))` in eager form. It is an approximation of
exact decoding: answers change. Differences by design: the cache is an object passed through the forward (no
global singleton, no patched methods), and each row of a batch keeps its own clock and picks its own tokens,
so a left-padded batch gives what each row gives alone.
"""

from __future__ import annotations

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


def parse_dllm_cache(text: str | None) -> dict[str, Any]:
    """A command line's `--dllm-cache [P,G,R]`: no value -> `{}` (the official defaults), "P,G,R" -> the three
    settings (prompt interval, answer interval, transfer ratio), checked by `dllm_cache_settings`."""
    if text is None or text == "":
        return {}
    parts = text.split(",")
    if len(parts) != 3:
        raise ValueError(
            f"--dllm-cache takes PROMPT_INTERVAL,GEN_INTERVAL,TRANSFER_RATIO (e.g. 25,7,0.25), got {text!r}"
        )
    try:
        settings = {
            "prompt_interval_steps": int(parts[0]),
            "gen_interval_steps": int(parts[1]),
            "transfer_ratio": float(parts[2]),
        }
    except ValueError:
        raise ValueError(
            f"--dllm-cache takes two integers and a number (e.g. 25,7,0.25), got {text!r}"
        ) from None
    dllm_cache_settings(settings)
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
        store[name] = store[name].index_copy(0, self.rows, value.to(store[name].dtype))

    def decoder_tokens(self, total_length: int) -> int:
        """Query positions per row that go through attention and the MLP in this group's pass (the value
        projection of the answer, needed to pick the recomputed positions, is not counted)."""
        answer = total_length - self.prompt_length
        moved = self.cache.num_transfer(answer)
        if self.refresh_prompt:
            return total_length if self.refresh_answer else self.prompt_length + moved
        return answer if self.refresh_answer else moved


__all__ = [
    "DLLM_CACHE_DEFAULTS",
    "FeatureCacheView",
    "FeaturePositions",
    "LladaVFeatureCache",
    "dllm_cache_settings",
    "parse_dllm_cache",
    "rope_table",
    "transfer_index",
]
