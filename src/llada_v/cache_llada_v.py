"""The key/value cache of fast decoding (`kv_cache`): `LladaVDiffusionCache`, which the attention layers of
`modeling_llada_v` write and read, and `DecoderWindows`, which plans each denoising pass's decoder window over it.

What the cache approximates: docs/generation.md#keyvalue-cache-kv_cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .generation_config_llada_v import LladaVGenerationConfig
from .sampling_llada_v import ClassifierFreeGuidance


class LladaVDiffusionCache:
    """Per-layer keys and values of the whole canvas, kept for the steps of a block (`kv_cache`).

    A full forward (`cache_start=0`) fills it; a later forward runs a window `[cache_start, cache_start + T)`,
    whose fresh keys/values overwrite the window's slots and whose queries attend over the whole cached sequence.
    The attention layers of `modeling_llada_v` call `update`; it lives for one `diffusion_generate` call. What
    this approximates: docs/generation.md#keyvalue-cache-kv_cache.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer_idx: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the window's (B, nkv, T, hd) keys/values at `start`; return the full cached sequence."""
        if self.keys[layer_idx] is None or (start == 0 and k.shape[2] >= self.keys[layer_idx].shape[2]):
            if start != 0:
                raise ValueError(f"the cache is empty: the first forward must start at 0, got cache_start={start}")
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v
        end = start + k.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            raise ValueError(f"window [{start}, {end}) exceeds the cached length {self.keys[layer_idx].shape[2]}")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx], self.values[layer_idx]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (rows that finished stop costing compute)."""
        self.keys = [None if k is None else k[rows] for k in self.keys]
        self.values = [None if v is None else v[rows] for v in self.values]


@dataclass
class DecoderWindow:
    """The canvas columns `[start, end)` one pass runs through the decoder, the cache it attends over (None:
    a plain full forward) and whether the pass refreshes that cache."""

    start: int
    end: int
    cache: LladaVDiffusionCache | None = None
    refreshed: bool = False


class DecoderWindows:
    """Plans each pass's decoder window and the cache it attends over (`kv_cache`,
    `kv_cache_prompt_refresh`: docs/generation.md#keyvalue-cache-kv_cache); without a cache every pass is a full
    forward over the canvas. The first pass of a block refreshes the cache (a full forward; with `"once"`, after
    the first block, the answer region and suffix over the first pass's prompt keys/values); the other passes run
    the block (`"dual"`) or the block and everything after it (`"prefix"`). Rows that finish leave the batch and
    their cache rows go with them.
    """

    def __init__(self, config: LladaVGenerationConfig, num_layers: int, answer_start: int, total_len: int):
        self.mode, self.prompt_refresh = config.kv_cache, config.kv_cache_prompt_refresh
        self.guidance = ClassifierFreeGuidance(config.cfg_scale)
        self.num_layers, self.answer_start, self.total_len = num_layers, answer_start, total_len
        self.cache: LladaVDiffusionCache | None = None  # the current block's cache ...
        self.cache_rows: torch.Tensor | None = None  # ... and the batch rows it holds
        self.call_cache: LladaVDiffusionCache | None = None  # "once": the first pass's cache, kept for its prompt
        self.call_rows: torch.Tensor | None = None

    def start_block(self) -> None:
        self.cache = None  # every block starts with a refresh

    def plan(self, rows: torch.Tensor, block_start: int, block_end: int) -> DecoderWindow:
        if self.mode is None:
            return DecoderWindow(0, self.total_len)
        if self.cache is None and (self.call_cache is None or self.prompt_refresh == "block"):
            self.cache, self.cache_rows = LladaVDiffusionCache(self.num_layers), rows
            if self.prompt_refresh == "once":
                self.call_cache, self.call_rows = self.cache, rows
            return DecoderWindow(0, self.total_len, self.cache, refreshed=True)
        if self.cache is None:
            self.cache, self.cache_rows = self._rows_of(self.call_cache, self.call_rows, rows), rows
            return DecoderWindow(self.answer_start, self.total_len, self.cache, refreshed=True)
        end = block_end if self.mode == "dual" else self.total_len
        self.cache, self.cache_rows = self._rows_of(self.cache, self.cache_rows, rows), rows
        return DecoderWindow(block_start, end, self.cache)

    def restrict(self, rows: torch.Tensor) -> None:
        """The planned pass runs only `rows` (a sorted subset of its rows: a row was dropped after planning)."""
        if self.cache is None:
            return
        if self.cache.length == 0:  # a refresh not run yet fills the cache for exactly these rows
            if self.call_cache is self.cache:
                self.call_rows = rows
            self.cache_rows = rows
            return
        self.cache, self.cache_rows = self._rows_of(self.cache, self.cache_rows, rows), rows

    def _rows_of(
        self, cache: LladaVDiffusionCache, cache_rows: torch.Tensor, rows: torch.Tensor
    ) -> LladaVDiffusionCache:
        """`cache` restricted to `rows` (a sorted subset of the sorted `cache_rows`).

        With CFG the cache holds both copies of each row (`ClassifierFreeGuidance.rows`). The call's cache (kept
        for later blocks) is copied before rows are dropped; any other cache loses them in place.
        """
        if torch.equal(cache_rows, rows):
            return cache
        keep = torch.searchsorted(cache_rows, rows)  # (b,)
        if not torch.equal(cache_rows[keep.clamp(max=cache_rows.shape[0] - 1)], rows):
            raise RuntimeError(f"rows {rows.tolist()} are not all in the cache (rows {cache_rows.tolist()})")
        keep = self.guidance.rows(keep, cache_rows.shape[0])
        if cache is self.call_cache:
            cache = copy.copy(cache)  # select_rows replaces the per-layer lists: the call's cache keeps its rows
        cache.select_rows(keep)
        return cache


__all__ = ["DecoderWindow", "DecoderWindows", "LladaVDiffusionCache"]
