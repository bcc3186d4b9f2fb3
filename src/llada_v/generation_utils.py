"""Masked-diffusion generation for LLaDA-V: `LladaVGenerationConfig` and `diffusion_generate`.

The sampler follows the released model's loop token for token at temperature 0 (docs/generation.md): the
answer starts as `max_new_tokens` mask tokens, is split into blocks decoded left to right, and each step
commits the most confident predictions of the current block. What differs from the official loop changes
cost, never results (docs/generation.md, docs/performance.md):

- masks are tracked by token id (the official loop compared embeddings, docs/parity.md Q12);
- logits are computed only at the columns that can still be committed (`logits_to_keep`), the float64
  softmax / Gumbel noise only there and in chunks: no `(batch, length, vocab)` float64 tensor, ever;
- the model dtype is respected (no forced fp16 autocast);
- images are encoded once per call and the prompt embeddings are reused at every step;
- any batch size with left padding: every row has its own schedule and stop state and gives exactly what
  it gives alone (temperature 0); rows that are finished leave the forward batch;
- a row stops once its stop sequence is committed and everything before it is decoded (the official loop
  does this too; the skipped passes would commit nothing).

Quirks kept for parity (docs/parity.md): `<|eot_id|>` and the mask id are not suppressed (Q13), the
stop-sequence search re-checks only the first criterion once a stop was found (Q15), the suffix is visible
from step 0 and is returned after the stop (Q16).

Fast decoding (opt-in, docs/performance.md; exact mode stays the default and is bit-identical):

- `kv_cache="dual"` / `"prefix"`: one full forward per block stores every layer's keys and values
  (`LladaVDiffusionCache`); the other steps of the block recompute only the current block ("dual") or the
  block and everything after it ("prefix") and attend over the cached rest. Approximate;
- `confidence_threshold`: a step also commits every candidate whose confidence exceeds the threshold
  (Fast-dLLM parallel decoding); the fixed schedule stays the minimum, so 1.0 is exact mode. Approximate;
- `LladaVGenerationConfig.fast(...)`: the recommended combination;
- `lm_head_shortlist`: a block's later passes compute the LM head only over the ids among the top few of its
  first pass, per row (a cheaper LM head and softmax; not in the preset). Approximate.

The loop reads top to bottom as named steps (`LladaVGenerationMixin.diffusion_generate`): settings, canvas,
then per block and step: active rows and columns (`_active`), the decoder window (`_DecoderWindows.plan`),
logits (`diffusion_logits`), predictions (`_predict`), commits (`_commit`), stops (`_update_stops`); finally
the output (`_assemble`).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from transformers.utils import ModelOutput, logging

from .compat_llada_v import GenerationConfig
from .configuration_llada_v import LladaVConfig

logger = logging.get_logger(__name__)

REMASKING_STRATEGIES = ("low_confidence", "random")
KV_CACHE_MODES = ("dual", "prefix")  # or None: no cache (exact)
PROMPT_REFRESH_MODES = ("block", "once")
# The recommended fast preset (`LladaVGenerationConfig.fast`): Fast-dLLM's dual cache and its 0.9 threshold.
FAST_DECODING_PRESET: dict[str, Any] = {"kv_cache": "dual", "confidence_threshold": 0.9}
DEFAULT_ANSWER_LENGTH = 128  # the official demo settings: steps 128 / gen 128 / block 128

# GenerationConfig fields that only steer autoregressive search, with the values that leave it unchanged:
# setting any other value is refused (`LladaVGenerationConfig.validate`) instead of being ignored.
AUTOREGRESSIVE_ONLY: dict[str, tuple] = {
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "num_return_sequences": (1,),
    "repetition_penalty": (1.0,),
    "length_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "min_length": (0,),
    "min_new_tokens": (0,),
    "use_cache": (),
    "typical_p": (1.0,),
    "min_p": (),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "diversity_penalty": (0.0,),
    "penalty_alpha": (),
    "sequence_bias": (),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "begin_suppress_tokens": (),
    "guidance_scale": (),
    "prompt_lookup_num_tokens": (),
    "max_time": (),
}

# The image inputs of `LladaVModel` (what the processor returns besides the text), passed on by `generate`.
_IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_layouts", "image_num_crops")

# Largest float64 block (in elements) the Gumbel noise and the softmax are computed on at once (64 MiB).
_FLOAT64_CHUNK_ELEMENTS = 1 << 23


def special_id_settings(model_config: dict) -> dict[str, Any]:
    """The sampler settings that follow from a model's special ids (a `LladaVConfig` as a dict; the released
    ids, `LladaVConfig`'s defaults, where it has none).

    Suppressed at mask positions: EOS, BOS, `<|start_header_id|>`, `<|end_header_id|>` (docs/parity.md Q13;
    `<|eot_id|>` stays allowed), without ids outside the model's vocabulary (tiny test vocabularies).
    """

    def pick(name: str) -> Any:
        value = model_config.get(name)
        return getattr(LladaVConfig, name) if value is None else value

    eos, bos = pick("eos_token_id"), pick("bos_token_id")
    pad = model_config.get("pad_token_id")
    suppress = [eos, bos, pick("start_header_token_id"), pick("end_header_token_id")]
    text = model_config.get("text_config") or {}
    vocab_size = text.get("vocab_size", model_config.get("vocab_size"))
    if vocab_size is not None:
        suppress = [i for i in suppress if i < vocab_size]
    return {
        "mask_token_id": pick("mask_token_id"),
        "pad_token_id": eos if pad is None else pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "suppress_tokens": suppress,
        "tokenizer_vocab_size": pick("tokenizer_vocab_size"),
        "stop_token_ids": [[pick("eot_token_id")]],
    }


_RELEASED_IDS = special_id_settings({})


# ----------------------------------------------------------------------------------------------------------
# Configuration


class LladaVGenerationConfig(GenerationConfig):
    r"""
    Settings of LLaDA-V's masked-diffusion sampler ([`LladaVGenerationMixin.diffusion_generate`]). Saved as and
    loaded from `generation_config.json`; the defaults are the released demo settings.

    Args:
        max_new_tokens (`int`, defaults to 128): the answer length (`gen_length` in the official code); the
            answer region starts as this many mask tokens.
        steps (`int`, defaults to 128): denoising steps (forward passes) in total, split evenly over the blocks.
        block_length (`int`, defaults to 128): blocks are decoded left to right; must divide `max_new_tokens`.
        temperature (`float`, defaults to 0.0): 0 takes the argmax; above 0 the token is the argmax of
            `exp(logits) / (-log u) ** temperature` with `u ~ U(0, 1)` in float64 (Gumbel-max).
        remasking (`str`, defaults to `"low_confidence"`): which predictions a step commits: the most
            probable ones (`"low_confidence"`, float64 softmax probability of the chosen token) or random
            ones (`"random"`).
        cfg_scale (`float`, defaults to 0.0): classifier-free guidance; above 0 an unconditional copy with every
            prompt position (image included) replaced by the mask token is run in the same forward and
            `logits = un + (cfg_scale + 1) * (cond - un)`.
        mask_token_id (`int`, defaults to 126336): `<|mdm_mask|>`.
        suppress_tokens (`list[int]`, defaults to `[126081, 126080, 126346, 126347]`): ids whose logits are set
            to -inf at mask positions (EOS, BOS and the header tokens; `<|eot_id|>` stays allowed).
        tokenizer_vocab_size (`int`, *optional*, defaults to 126349): ids at or above it are suppressed too (the
            released tokenizer has 126349 entries while the embedding has 126464 rows). `None` disables it.
        stop_token_ids (`list[list[int]]`, *optional*, defaults to `[[126348]]`): stop sequences, each a list of
            ids (a bare int is a one-token sequence). After every step the answer region is searched; once a
            stop is found only the positions before it are decoded, and it is excluded from the result.
        stop_strings (`list[str]`, *optional*): more stop sequences as text, encoded with the `tokenizer` passed
            to `diffusion_generate` (without special tokens) and searched after `stop_token_ids`.
        suffix_token_ids (`list[int]`, *optional*): a fixed suffix placed after the answer region from step 0
            (visible to attention, never overwritten) and returned after the answer.
        generation_suffix (`str`, *optional*): the suffix as text (needs `tokenizer`); exclusive with
            `suffix_token_ids`.
        pad_token_id (`int`, defaults to 126081): fills the positions after a found stop in `sequences`.
        output_history (`bool`, defaults to False): with `return_dict_in_generate`, return the canvas after
            every forward pass.
        top_k (`int`, *optional*), top_p (`float`, *optional*): with `temperature > 0`, the token choice at each
            position is sampled among its `top_k` most likely ids / its smallest set of ids of probability mass
            >= `top_p`, and the confidence is the probability under that filtered distribution.
        eos_token_id (`int` or `list[int]`, defaults to 126081): also one-token stop sequences, searched after
            `stop_token_ids` and `stop_strings` (the released EOS is suppressed at masks, so it never fires).
        bad_words_ids (`list[list[int]]`, *optional*): one-token entries are suppressed like `suppress_tokens`.
        max_length (`int`, *optional*): prompt + answer length; when set, the answer has `max_length` minus the
            prompt length tokens (`steps` and `block_length` must fit it).
        do_sample (`bool`, *optional*): may be given, and must agree with `temperature` (sampling iff > 0).
        Other GenerationConfig fields (`num_beams`, `repetition_penalty`, `use_cache`, ...) only steer
        autoregressive search: setting them raises `ValueError` (`AUTOREGRESSIVE_ONLY`).
        return_dict_in_generate (`bool`, defaults to False): return a [`LladaVGenerateOutput`] instead of the
            sequences tensor.

        Fast decoding (docs/performance.md). With the defaults below the sampler is the exact one above.

        kv_cache (`str`, *optional*, defaults to None): reuse keys and values across the steps of a block
            (Fast-dLLM's block-wise cache). The first pass of every block is a full forward that stores every
            layer's keys/values of the whole canvas (the refresh; its logits are exact and decide that step);
            the other passes of the block feed only a window to the decoder, whose queries attend over the
            cached sequence with the window's keys/values refreshed:
            - `"dual"`: the window is the current block; the prompt, the earlier blocks, the later blocks and
              the suffix are cached;
            - `"prefix"`: the window is the current block and everything after it (later blocks, suffix); only
              the prompt and the earlier blocks are cached.
            **Approximation**: the cached keys/values of positions outside the window were computed from the
            canvas at the block's start, so they do not see the tokens committed since (in a bidirectional model
            every position attends to them). With a one-layer decoder nothing is stale (keys/values depend only
            on the positions' own tokens, which do not change inside a block) and the result is exact up to float
            rounding. `None`: the full canvas at every step (exact).
        kv_cache_prompt_refresh (`str`, defaults to `"block"`): with `kv_cache`, how often the prompt (image
            included) goes through the decoder. `"block"`: at the start of every block (the full forward above,
            Fast-dLLM). `"once"`: only in the first pass of the call; the first pass of each later block
            recomputes the answer region and the suffix, attending over the cached prompt. **Approximation**
            on top of `kv_cache`: the prompt's keys/values are those of the all-mask answer for the whole call
            (dLLM-Cache's observation that prompt features barely move, taken to its limit). Saves
            `num_blocks - 1` full forwards.
        confidence_threshold (`float`, *optional*, defaults to None): parallel decoding (Fast-dLLM). Besides the
            tokens the fixed schedule commits, a step also commits every candidate of the current block whose
            confidence (the float64 softmax probability of its prediction) is strictly above this value, in
            (0, 1]. The schedule (`steps`) stays the minimum, so a block takes at most `steps / num_blocks`
            passes and `steps = max_new_tokens` gives Fast-dLLM's "at least one token per step" rule; 1.0 never
            commits extra tokens and is exactly the default sampler. **Approximation**: tokens committed in the
            same step are predicted independently of one another (the joint choice the schedule would have made
            one by one can differ). Needs `remasking="low_confidence"`.
        lm_head_shortlist (`int`, *optional*, defaults to None): a cheaper LM head (docs/generation.md, "LM head
            shortlist"). The first pass of every block computes logits over the whole vocabulary; the ids among
            the `lm_head_shortlist` likeliest of any candidate column (suppressed ids excluded) form the block's
            shortlist, and the block's later passes compute the LM head, the token choice and the float64
            softmax over those ids only. **Approximation**: an id outside the shortlist is never chosen later
            in the block, and a confidence is the probability within the shortlist (at least the full one).
            Needs `temperature=0` and `remasking="low_confidence"`. `None`: the whole vocabulary (exact).

    The recommended fast combination is [`LladaVGenerationConfig.fast`].
    """

    # Fields of this class (not of GenerationConfig), popped before GenerationConfig sees the kwargs, so a
    # `generation_config.json` with `"_from_model_config": true` keeps them.
    _diffusion_defaults: dict[str, Any] = {
        "steps": DEFAULT_ANSWER_LENGTH,
        "block_length": DEFAULT_ANSWER_LENGTH,
        "remasking": "low_confidence",
        "cfg_scale": 0.0,
        "mask_token_id": _RELEASED_IDS["mask_token_id"],
        "tokenizer_vocab_size": _RELEASED_IDS["tokenizer_vocab_size"],
        "stop_token_ids": _RELEASED_IDS["stop_token_ids"],
        "suffix_token_ids": None,
        "generation_suffix": None,
        "output_history": False,
        "kv_cache": None,
        "confidence_threshold": None,
        "kv_cache_prompt_refresh": "block",
        "lm_head_shortlist": None,
    }
    # GenerationConfig fields whose default differs here.
    _inherited_defaults: dict[str, Any] = {
        "max_new_tokens": DEFAULT_ANSWER_LENGTH,
        "temperature": 0.0,
        "suppress_tokens": _RELEASED_IDS["suppress_tokens"],
        "pad_token_id": _RELEASED_IDS["pad_token_id"],
        "bos_token_id": _RELEASED_IDS["bos_token_id"],
        "eos_token_id": _RELEASED_IDS["eos_token_id"],
        "return_dict_in_generate": False,
    }

    def __init__(self, **kwargs):
        for name, default in self._diffusion_defaults.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        for name, default in self._inherited_defaults.items():
            kwargs.setdefault(name, copy.deepcopy(default))
        if kwargs["suppress_tokens"] is None:
            kwargs["suppress_tokens"] = []  # None would not survive a save/load round trip (diff to defaults)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "LladaVGenerationConfig":
        """The released sampler defaults with the special ids of `model_config` (a `LladaVConfig` or its dict),
        see `special_id_settings`."""
        config = model_config if isinstance(model_config, dict) else model_config.to_dict()
        generation_config = cls(**special_id_settings(config))
        generation_config._original_object_hash = hash(generation_config)
        return generation_config

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Checks every sampler setting; raises `ValueError` naming the offending values.

        GenerationConfig's own checks are about autoregressive sampling and are not run. Its fields that have a
        meaning in masked diffusion are honoured (`top_k`, `top_p`, `eos_token_id`, `bad_words_ids`,
        `max_length`, `do_sample`, see the class docstring); any other one set to a value that would change an
        autoregressive search is refused (`AUTOREGRESSIVE_ONLY`), so nothing is ignored silently.
        """
        self._check_schedule()
        self._check_sampling()
        self._check_ids_and_stops()
        self._check_fast_decoding()
        for name, neutral in AUTOREGRESSIVE_ONLY.items():
            value = getattr(self, name, None)
            if value is not None and value not in neutral:
                raise ValueError(
                    f"{name}={value!r} has no meaning in masked diffusion (every answer position is predicted at "
                    f"every step); leave it unset. The sampler's settings are the fields of {type(self).__name__}"
                )
        for name in ("output_history", "return_dict_in_generate"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")

    def _check_schedule(self) -> None:
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length <= 0):
            raise ValueError(f"max_length must be a positive integer (prompt + answer tokens), got {self.max_length!r}")
        for name in ("max_new_tokens", "steps", "block_length"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length is not None:
            return  # the answer length is known once the prompt is: checked then (`_answer_length_from_max_length`)
        n, b, s = self.max_new_tokens, self.block_length, self.steps
        if n % b != 0:
            raise ValueError(f"max_new_tokens ({n}) must be divisible by block_length ({b})")
        num_blocks = n // b
        if s % num_blocks != 0:
            raise ValueError(
                f"steps ({s}) must be divisible by the number of blocks ({num_blocks} = max_new_tokens {n} / "
                f"block_length {b})"
            )
        if s > n:
            raise ValueError(f"steps ({s}) must not exceed max_new_tokens ({n}): every step commits at least one token")

    def _check_sampling(self) -> None:
        for name in ("temperature", "cfg_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.remasking not in REMASKING_STRATEGIES:
            raise ValueError(f"remasking must be one of {REMASKING_STRATEGIES}, got {self.remasking!r}")
        if self.do_sample is not None and self.do_sample != (self.temperature > 0):
            raise ValueError(
                f"do_sample={self.do_sample} contradicts temperature={self.temperature}: this sampler samples exactly "
                "when temperature > 0 (leave do_sample unset)"
            )
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k <= 0):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if (self.top_k is not None or self.top_p is not None) and self.temperature == 0:
            raise ValueError(
                f"top_k ({self.top_k}) / top_p ({self.top_p}) filter the sampled token choice and need temperature > 0 "
                "(at temperature 0 the choice is the argmax)"
            )

    def _check_ids_and_stops(self) -> None:
        for name in ("mask_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a token id (int >= 0), got {value!r}")
        if self.tokenizer_vocab_size is not None and (
            not _is_int(self.tokenizer_vocab_size) or self.tokenizer_vocab_size <= 0
        ):
            raise ValueError(
                f"tokenizer_vocab_size must be a positive integer or None, got {self.tokenizer_vocab_size!r}"
            )
        _check_ids("suppress_tokens", self.suppress_tokens)
        eos = self.eos_token_id
        if eos is not None:
            _check_ids("eos_token_id", [eos] if _is_int(eos) else eos)
        bad = self.bad_words_ids
        if bad is not None and (
            isinstance(bad, (str, bytes)) or not all(isinstance(w, (list, tuple)) and len(w) == 1 for w in bad)
        ):
            raise ValueError(
                f"bad_words_ids must be a list of one-token lists, got {bad!r}: a sequence of several tokens cannot be "
                "banned position by position in masked diffusion"
            )
        if bad is not None:
            _check_ids("bad_words_ids", [w[0] for w in bad])
        normalize_stop_sequences(self.stop_token_ids)
        if self.suffix_token_ids is not None:
            _check_ids("suffix_token_ids", self.suffix_token_ids)
        if self.suffix_token_ids is not None and self.generation_suffix is not None:
            raise ValueError(
                f"give the suffix once: suffix_token_ids ({self.suffix_token_ids}) or generation_suffix "
                f"({self.generation_suffix!r}), not both"
            )
        if self.stop_strings is not None and (
            isinstance(self.stop_strings, str) or not all(isinstance(s, str) and s for s in self.stop_strings)
        ):
            raise ValueError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r}")

    def _check_fast_decoding(self) -> None:
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be None or one of {KV_CACHE_MODES}, got {self.kv_cache!r}")
        if self.kv_cache_prompt_refresh not in PROMPT_REFRESH_MODES:
            raise ValueError(
                f"kv_cache_prompt_refresh must be one of {PROMPT_REFRESH_MODES}, got {self.kv_cache_prompt_refresh!r}"
            )
        if self.kv_cache_prompt_refresh != "block" and self.kv_cache is None:
            raise ValueError(
                f"kv_cache_prompt_refresh={self.kv_cache_prompt_refresh!r} needs a kv_cache ('dual' or 'prefix'), "
                "got kv_cache=None"
            )
        threshold = self.confidence_threshold
        if threshold is not None:
            if not _is_number(threshold) or not 0 < threshold <= 1:
                raise ValueError(f"confidence_threshold must be None or a number in (0, 1], got {threshold!r}")
            if self.remasking != "low_confidence":
                raise ValueError(
                    f"confidence_threshold ({threshold}) compares softmax probabilities and needs "
                    f"remasking='low_confidence', got remasking={self.remasking!r}"
                )
        self._check_shortlist()

    def _check_shortlist(self) -> None:
        size = self.lm_head_shortlist
        if size is None:
            return
        if not _is_int(size) or size < 1:
            raise ValueError(f"lm_head_shortlist must be None or a positive integer, got {size!r}")
        if self.temperature != 0 or self.remasking != "low_confidence":
            raise ValueError(
                f"lm_head_shortlist ({size}) ranks ids by their logits and needs temperature=0 and "
                f"remasking='low_confidence', got temperature={self.temperature!r}, remasking={self.remasking!r}"
            )

    @classmethod
    def fast(cls, base: GenerationConfig | None = None, **overrides) -> "LladaVGenerationConfig":
        """The recommended fast decoding settings on top of `base` (default: the released defaults).

        `kv_cache="dual"` + `confidence_threshold=0.9` (Fast-dLLM's settings); every other field, including
        `steps`, comes from `base`, then `overrides` win. Use the model's own config as the
        base so its special ids are kept:

            config = LladaVGenerationConfig.fast(model.generation_config, block_length=32)
            model.diffusion_generate(input_ids, generation_config=config)

        The result approximates exact decoding (see `kv_cache` and `confidence_threshold`). With `steps` equal to
        `max_new_tokens` (the demo default) a step commits at least one token; fewer steps raise that minimum.
        """
        config, unknown = resolve_generation_config(cls() if base is None else base, {**FAST_DECODING_PRESET, **overrides})
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; they are the fields of {cls.__name__}")
        return config

    @property
    def num_blocks(self) -> int:
        return self.max_new_tokens // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def is_diffusion_config(config: GenerationConfig) -> bool:
    """A `LladaVGenerationConfig`, of this module or of another copy of it (remote code loads it again)."""
    return all(hasattr(config, name) for name in LladaVGenerationConfig._diffusion_defaults)


def resolve_generation_config(
    base: GenerationConfig, overrides: dict[str, Any] | None = None
) -> tuple[LladaVGenerationConfig, dict[str, Any]]:
    """`base` with `overrides` applied, as a new `LladaVGenerationConfig` validated once with both; returns it
    and the overrides that are no setting of it.

    `base` may be a `LladaVGenerationConfig`, the same class from another copy of this module (remote code
    loads the module again: no `isinstance` across copies, but every field is there) or any other
    `GenerationConfig` (what it sets, the released defaults for the rest).
    """
    overrides = dict(overrides or {})
    if isinstance(base, LladaVGenerationConfig):
        config = copy.deepcopy(base)
        return config, config.update(**overrides)
    if is_diffusion_config(base):
        settings = base.to_dict()
    else:
        settings = base.to_diff_dict()
    known = set(LladaVGenerationConfig().to_dict())
    settings.update({k: v for k, v in overrides.items() if k in known})
    return LladaVGenerationConfig.from_dict(settings), {k: v for k, v in overrides.items() if k not in known}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_ids(name: str, ids: Any) -> None:
    if ids is None or isinstance(ids, (str, bytes)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a list of token ids (ints >= 0), got {ids!r}")


def normalize_stop_sequences(stop_token_ids: Any) -> list[list[int]]:
    """`None`, `[id, ...]` or `[[id, ...], ...]` (mixed allowed) -> a list of non-empty id lists, in order."""
    if stop_token_ids is None:
        return []
    if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Sequence):
        raise ValueError(f"stop_token_ids must be a list of id sequences, got {stop_token_ids!r}")
    sequences = []
    for entry in stop_token_ids:
        seq = [entry] if _is_int(entry) else entry
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise ValueError(f"every stop sequence must be a token id or a non-empty list of ids, got {entry!r}")
        _check_ids("a stop sequence", seq)
        sequences.append([int(i) for i in seq])
    return sequences


# ----------------------------------------------------------------------------------------------------------
# Pure sampling helpers (no model needed)


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


# ----------------------------------------------------------------------------------------------------------
# The key/value cache of fast decoding


class LladaVDiffusionCache:
    """Per-layer keys and values of the whole canvas, for re-using them across denoising steps.

    A masked-diffusion step changes only a few tokens, so the keys and values of the others barely move.
    Fast-dLLM-style decoding refreshes the cache with one full forward (`cache_start=0` over the whole
    sequence), then recomputes only a window `[cache_start, cache_start + T)` each step: its fresh keys and
    values overwrite the window's slots and its queries attend over the full cached sequence. What stays
    approximate is the cached part (prompt, and in "dual" mode the positions after the window), which was
    computed from an older canvas. It lives for one `diffusion_generate` call; no global state. The
    attention layers of `modeling_llada_v` call `update`.
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
class _DecoderWindow:
    """The canvas columns `[start, end)` one pass runs through the decoder, the cache it attends over (None:
    a plain full forward) and whether the pass refreshes that cache."""

    start: int
    end: int
    cache: LladaVDiffusionCache | None = None
    refreshed: bool = False


class _DecoderWindows:
    """Plans each pass's decoder window for `kv_cache` (docs/performance.md); without a cache every pass is a
    full forward over the canvas.

    With a cache, the first pass of every block refreshes it: a full forward (`kv_cache_prompt_refresh=
    "block"`, and the first block of `"once"`), or with `"once"` after the first block the answer region and
    suffix only, attending over the prompt keys/values of the call's first pass. The other passes of a block
    run the block ("dual") or the block and everything after it ("prefix"). Rows that finish leave the
    batch; their cache rows go with them.
    """

    def __init__(self, config: "LladaVGenerationConfig", num_layers: int, answer_start: int, total_len: int):
        self.mode, self.prompt_refresh = config.kv_cache, config.kv_cache_prompt_refresh
        self.cfg = config.cfg_scale > 0
        self.num_layers, self.answer_start, self.total_len = num_layers, answer_start, total_len
        self.cache: LladaVDiffusionCache | None = None  # the current block's cache ...
        self.cache_rows: torch.Tensor | None = None  # ... and the batch rows it holds
        self.call_cache: LladaVDiffusionCache | None = None  # "once": the first pass's cache, kept for its prompt
        self.call_rows: torch.Tensor | None = None

    def start_block(self) -> None:
        self.cache = None  # every block starts with a refresh

    def plan(self, rows: torch.Tensor, block_start: int, block_end: int) -> _DecoderWindow:
        if self.mode is None:
            return _DecoderWindow(0, self.total_len)
        if self.cache is None and (self.call_cache is None or self.prompt_refresh == "block"):
            self.cache, self.cache_rows = LladaVDiffusionCache(self.num_layers), rows
            if self.prompt_refresh == "once":
                self.call_cache, self.call_rows = self.cache, rows
            return _DecoderWindow(0, self.total_len, self.cache, refreshed=True)
        if self.cache is None:
            self.cache, self.cache_rows = self._rows_of(self.call_cache, self.call_rows, rows), rows
            return _DecoderWindow(self.answer_start, self.total_len, self.cache, refreshed=True)
        end = block_end if self.mode == "dual" else self.total_len
        self.cache, self.cache_rows = self._rows_of(self.cache, self.cache_rows, rows), rows
        return _DecoderWindow(block_start, end, self.cache)

    def _rows_of(self, cache: LladaVDiffusionCache, cache_rows: torch.Tensor, rows: torch.Tensor) -> LladaVDiffusionCache:
        """`cache` restricted to `rows` (a sorted subset of the sorted `cache_rows`).

        With CFG the cache holds the conditional rows, then the unconditional ones. The call's cache (kept for
        later blocks) is copied before rows are dropped; any other cache loses them in place.
        """
        if torch.equal(cache_rows, rows):
            return cache
        keep = torch.searchsorted(cache_rows, rows)  # (b,)
        if not torch.equal(cache_rows[keep.clamp(max=cache_rows.shape[0] - 1)], rows):
            raise RuntimeError(f"rows {rows.tolist()} are not all in the cache (rows {cache_rows.tolist()})")
        if self.cfg:
            keep = torch.cat((keep, keep + cache_rows.shape[0]))
        if cache is self.call_cache:
            cache = copy.copy(cache)  # select_rows replaces the per-layer lists: the call's cache keeps its rows
        cache.select_rows(keep)
        return cache


# ----------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class LladaVGenerateOutput(ModelOutput):
    """
    Output of [`LladaVGenerationMixin.generate`] and [`LladaVGenerationMixin.diffusion_generate`] with
    `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch, prompt_length + max_new_tokens + suffix_length)`): the
            prompt as given, then per row the answer up to (excluding) the stop sequence, then the suffix, then
            `pad_token_id` up to the end. `sequences[:, prompt_length:]` without the trailing padding is exactly
            what the official `generate` returns.
        answer_lengths (`torch.LongTensor` of shape `(batch,)`): answer tokens before the stop (or
            `max_new_tokens`), suffix excluded.
        prompt_length (`int`): columns of the (padded) prompt; the answers start there in `sequences`.
        num_forward_passes (`int`): model forward calls of this call (a CFG step is one call of a doubled batch).
        forward_passes_per_row (`torch.LongTensor` of shape `(batch,)`): forward calls each row took part in.
        num_decoder_tokens (`int`): query positions run through the decoder, summed over passes and rows (CFG
            copies included): `passes x rows x canvas length` without a cache, less with one. Divided by
            `batch x canvas length` it is the cost in units of one full forward.
        history (`tuple[torch.LongTensor]`, *optional*): with `output_history`, the canvas `(batch, length)`
            after every forward pass (masks are `mask_token_id`; nothing is padded or moved).
        tokens_per_forward (`torch.FloatTensor` of shape `(batch,)`): per row, the answer tokens it returns
            (`answer_lengths`: up to the stop, suffix excluded) divided by the forward passes it took part in
            (`forward_passes_per_row`), as transformers' DiffusionGemma reports it (docs/generation.md).
    """

    sequences: torch.LongTensor | None = None
    answer_lengths: torch.LongTensor | None = None
    prompt_length: int | None = None
    num_forward_passes: int | None = None
    forward_passes_per_row: torch.LongTensor | None = None
    num_decoder_tokens: int | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    tokens_per_forward: torch.FloatTensor | None = None

    def answer_ids(self) -> list[list[int]]:
        """Each row's answer ids: after the prompt, up to the stop (suffix and padding excluded)."""
        start = self.prompt_length
        return [self.sequences[row, start : start + int(n)].tolist() for row, n in enumerate(self.answer_lengths)]


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


def _active(state: _DenoisingState, block_start: int, block_end: int) -> _Active | None:
    """Rows that still have masks in the block and the columns they may commit (masks of the answer before
    the block end, or before the row's stop). A row whose stop is found and has nothing left to decode before
    it is finished. None when no row steps."""
    is_mask = state.canvas == state.mask_token_id  # (B, T)
    columns = state.columns
    limit = torch.tensor(
        [block_end if s is None else state.prompt_len + s for s in state.stop_index], device=state.canvas.device
    )  # (B,)
    candidate = is_mask & (columns >= state.prompt_len) & (columns[None, :] < limit[:, None])  # (B, T)
    for row, stop in enumerate(state.stop_index):
        if stop is not None and not bool(candidate[row].any()):
            state.done[row] = True
    stepping = ~state.done & is_mask[:, block_start:block_end].any(-1)
    if not bool(stepping.any()):
        return None
    rows = stepping.nonzero().squeeze(1)
    positions = candidate[rows].any(0).nonzero().squeeze(1)
    return _Active(rows, positions, candidate[rows][:, positions])


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


def _predict(
    logits: torch.Tensor,
    suppress: torch.Tensor,
    config: LladaVGenerationConfig,
    generator: torch.Generator | None,
    shortlist: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Suppress ids in place, then the token choice and its confidence at every column: `(b, K)` each.

    With a `shortlist` `(b, S)` the logits are `(b, K, S)` over each row's ids, which hold no suppressed id
    (see `build_shortlist`; unused slots are -inf): the choice is mapped back to vocabulary ids."""
    if shortlist is not None:
        b, k_cols, size = logits.shape
        flat = logits.reshape(b * k_cols, size)
        local = flat.argmax(-1)  # temperature 0 (checked by the config)
        confidence = token_confidence(flat, local, config.remasking, generator).view(b, k_cols)
        tokens = shortlist.gather(1, local.view(b, k_cols))
        return tokens, confidence.masked_fill(tokens < 0, float("-inf"))  # an empty shortlist commits nothing
    logits[..., suppress] = float("-inf")
    vocab_limit = config.tokenizer_vocab_size
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[..., vocab_limit:] = float("-inf")
    b, k_cols, vocab = logits.shape
    flat = logits.reshape(b * k_cols, vocab)
    if config.temperature > 0 and (config.top_k is not None or config.top_p is not None):
        filter_top_k_top_p(flat, config.top_k, config.top_p)
    tokens = sample_tokens(flat, config.temperature, generator).view(b, k_cols)
    confidence = token_confidence(flat, tokens.view(-1), config.remasking, generator).view(b, k_cols)
    return tokens, confidence


def _commit(
    canvas: torch.Tensor,
    active: _Active,
    tokens: torch.Tensor,
    confidence: torch.Tensor,
    k: torch.Tensor,
    threshold: float | None,
) -> torch.Tensor:
    """Write the `k[row]` most confident candidates of each row (and, with a threshold, every candidate above
    it) into the canvas; returns which predictions were committed, `(b, K)`."""
    confidence = confidence.masked_fill(~active.candidate, float("-inf"))
    committed = select_top_k(confidence, k)
    if threshold is not None:
        committed |= confidence > threshold  # parallel decoding: -inf (non-candidates) never passes
    previous = canvas[active.rows][:, active.positions]
    canvas[active.rows[:, None], active.positions[None, :]] = torch.where(committed, tokens, previous)
    return committed


def _answer_length_from_max_length(config: LladaVGenerationConfig, prompt_length: int) -> None:
    """`max_length` counts prompt and answer: the answer gets the rest (this call's config is a copy)."""
    answer = config.max_length - prompt_length
    if answer < 1:
        raise ValueError(f"max_length ({config.max_length}) leaves no room after the prompt ({prompt_length} tokens)")
    config.max_new_tokens = answer
    config.max_length = None  # the answer length is set now
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"max_length ({config.max_length}) - prompt ({prompt_length}) = {answer} new tokens: {err}") from None


def _update_stops(state: _DenoisingState, rows: torch.Tensor, stop_sequences: list[list[int]]) -> None:
    """Search each stepped row's answer region for the stop sequences (docs/parity.md Q15)."""
    if not stop_sequences:
        return
    for row in rows.tolist():
        answer = state.canvas[row, state.prompt_len : state.answer_end]
        state.stop_index[row] = find_stop(answer, stop_sequences, state.stop_index[row])


# ----------------------------------------------------------------------------------------------------------
# Streaming (`generate(streamer=...)`)


class _StreamerFeed:
    """A `step_callback` that feeds a transformers-style streamer from the denoising of a batch of one.

    The streamer receives what transformers' DiffusionGemma sends (docs/generation.md#streaming):
    `put(prompt ids)` once, then `put(ids)` with answer tokens that are final, left to right and never sent twice,
    `put_draft(value=ids)` after every forward pass when the streamer has that method, and `end()` (called by
    `generate`). A committed token never changes, but the answer is cut at the stop, which is searched in the
    committed tokens: a token is sent once nothing before it is masked and no stop sequence can still start
    at or before it (the last `longest stop - 1` tokens wait), or once the stop is known with nothing masked
    before it (docs/parity.md Q15: only an earlier occurrence of the first criterion can still move a stop).
    """

    def __init__(
        self, streamer: Any, mask_token_id: int, stop_sequences: list[list[int]], suffix_length: int, block_length: int
    ):
        self.streamer = streamer
        self.mask_token_id = mask_token_id
        self.block_length = block_length
        self.hold = max((len(seq) for seq in stop_sequences), default=1) - 1
        self.suffix_length = suffix_length
        self.sent = 0  # answer tokens already `put`
        self.started = False

    def __call__(self, step: LladaVDiffusionStep) -> None:
        canvas = step.canvas[0]  # (T,) batch of one (checked by `generate`)
        if not self.started:
            self.streamer.put(canvas[: step.prompt_length].cpu()[None])  # (1, P) the prompt, as DiffusionGemma
            self.started = True
        answer = canvas[step.prompt_length : canvas.shape[0] - self.suffix_length]  # (N,)
        masked = (answer == self.mask_token_id).nonzero()
        first_mask = int(masked[0, 0]) if masked.numel() else answer.shape[0]
        stop = step.stop_indices[0]
        ready = stop if stop is not None and first_mask >= stop else first_mask - self.hold
        if stop is not None:
            ready = min(ready, stop)
        if ready > self.sent:
            self.streamer.put(answer[self.sent : ready].cpu()[None])  # (1, n)
            self.sent = ready
        if hasattr(self.streamer, "put_draft"):
            self._put_draft(step, answer, stop)

    def _put_draft(self, step: LladaVDiffusionStep, answer: torch.Tensor, stop: int | None) -> None:
        """The answer after what was sent, up to the end of the block being decoded (or the stop): committed
        tokens, and this step's prediction at every position still masked (every mask there is a column this
        pass predicted). `(1, n)`, sent after every pass (`n` is 0 when everything up to there was sent)."""
        draft = answer.clone()
        columns = step.positions - step.prompt_length  # (K,) answer indices of the predicted columns
        keep = columns < draft.shape[0]
        columns, predicted = columns[keep], step.tokens[0][keep]
        draft[columns] = torch.where(draft[columns] == self.mask_token_id, predicted, draft[columns])
        end = min((step.block + 1) * self.block_length, draft.shape[0])
        if stop is not None:
            end = min(end, stop)
        self.streamer.put_draft(value=draft[self.sent : max(end, self.sent)].cpu()[None])

    def finish(self, answer_ids: list[int], prompt: torch.Tensor) -> None:
        """After the last pass: the rest of the answer (the tokens held back, or all of it when no pass ran)."""
        if not self.started:
            self.streamer.put(prompt.cpu())
        if len(answer_ids) > self.sent:
            self.streamer.put(torch.tensor([answer_ids[self.sent :]], dtype=torch.long))
        self.sent = len(answer_ids)


def _chain_callbacks(*callbacks: Callable[[LladaVDiffusionStep], None] | None) -> Callable | None:
    present = [c for c in callbacks if c is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def chained(step: LladaVDiffusionStep) -> None:
        for callback in present:
            callback(step)

    return chained


# ----------------------------------------------------------------------------------------------------------
# The sampler


class LladaVGenerationMixin:
    """Adds `generate` (transformers' diffusion-LM interface) and `diffusion_generate` to `LladaVModel`, and
    loads `generation_config.json` at `from_pretrained`.

    Deliberately not transformers' `GenerationMixin` (docs/generation.md#why-not-generationmixin): LLaDA-V is not
    autoregressive. This class is a direct base of the model and its name ends in `GenerationMixin`, which is
    what transformers checks (`can_generate`, and the Auto classes, which otherwise mix the autoregressive
    `GenerationMixin` into a remote-code class that defines `generate`), as for DiffusionGemma.
    """

    def adjust_generation_fn(
        self,
        generation_config,
        from_auto_class,
        from_pipeline,
        pretrained_model_name_or_path,
        cache_dir,
        force_download,
        proxies,
        local_files_only,
        token,
        revision,
        subfolder,
        trust_remote_code,
        **kwargs,
    ) -> None:
        """Called by `from_pretrained`: use the given `generation_config`, else the checkpoint's
        `generation_config.json`, else keep the defaults derived from the model config."""
        del trust_remote_code  # no custom generate function is loaded
        if generation_config is not None:
            self.generation_config = self.generation_config_class.from_dict(generation_config.to_dict())
        elif pretrained_model_name_or_path is not None:
            repo_kwargs = {
                "cache_dir": cache_dir,
                "force_download": force_download,
                "proxies": proxies,
                "local_files_only": local_files_only,
                "token": token,
                "revision": revision,
                "subfolder": subfolder,
                **kwargs,
            }
            try:
                self.generation_config = self.generation_config_class.from_pretrained(
                    pretrained_model_name_or_path,
                    _from_auto=from_auto_class,
                    _from_pipeline=from_pipeline,
                    **repo_kwargs,
                )
            except OSError as err:
                saved = os.path.join(str(pretrained_model_name_or_path), subfolder or "", "generation_config.json")
                if os.path.isfile(saved):  # there, but unreadable: never fall back silently
                    raise ValueError(f"{saved} cannot be loaded: {err}") from None
                logger.info("No generation_config.json found: using the defaults derived from the model config.")

    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, overrides: dict[str, Any]
    ) -> LladaVGenerationConfig:
        model_config = getattr(self, "generation_config", None)
        if model_config is None:
            model_config = LladaVGenerationConfig.from_model_config(self.config)
        base, settings = generation_config, {}
        if generation_config is None:
            base = model_config
        elif not is_diffusion_config(generation_config):
            # A plain GenerationConfig: what it sets, on top of this model's own settings (its special ids).
            base = model_config
            settings = {k: v for k, v in generation_config.to_diff_dict().items() if k != "transformers_version"}
        config, unknown = resolve_generation_config(base, {**settings, **overrides})
        if unknown:
            raise TypeError(
                f"diffusion_generate got unexpected keyword arguments {sorted(unknown)}; generation settings are the "
                f"fields of LladaVGenerationConfig"
            )
        return config

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: Any = None,
        step_callback: Callable[[LladaVDiffusionStep], None] | None = None,
        generator: torch.Generator | None = None,
        tokenizer: Any = None,
        **kwargs,
    ) -> torch.LongTensor | LladaVGenerateOutput:
        r"""
        Generate answers by masked diffusion with transformers' diffusion-LM interface (DiffusionGemma's):
        `model.generate(**processor(...), max_new_tokens=..., streamer=...)`. The ids are exactly those of
        [`diffusion_generate`] with the same settings, which this calls (docs/generation.md#generate).

        Args:
            input_ids, attention_mask: as in [`diffusion_generate`]; the image tensors the processor returns
                (`pixel_values`, `image_sizes`, `image_layouts`, `image_num_crops`) go in `kwargs`.
            generation_config (`LladaVGenerationConfig`, *optional*): defaults to `self.generation_config`;
                `kwargs` that are fields of it override it (`max_new_tokens=64, steps=64`).
            streamer (*optional*): batch of one. Receives `put(prompt ids)`, then `put(ids)` with each run of answer
                tokens that is final (in order; their concatenation is the answer up to the stop), after every
                forward pass `put_draft(value=ids)` with the answer ahead of them (committed tokens and the current
                predictions) if it has that method, and `end()`. `transformers.TextStreamer` and
                `TextDiffusionStreamer` work as they are.
            step_callback, generator, tokenizer: as in [`diffusion_generate`].

        Returns:
            `torch.LongTensor` (the `sequences` of [`diffusion_generate`]), or with `return_dict_in_generate=True` a
            [`LladaVGenerateOutput`] with `sequences` and `tokens_per_forward`.
        """
        images = {name: kwargs.pop(name) for name in _IMAGE_INPUTS if name in kwargs}
        config = self._resolve_generation_config(generation_config, kwargs)
        return_dict, config.return_dict_in_generate = config.return_dict_in_generate, True
        feed = None
        if streamer is not None:
            batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
            if batch != 1:
                raise ValueError(
                    f"a streamer needs a batch of one prompt (as in transformers), got input_ids of shape "
                    f"{tuple(getattr(input_ids, 'shape', ()))}; call generate without streamer for a batch"
                )
            stops, suffix = self._stops_and_suffix(config, tokenizer)
            feed = _StreamerFeed(streamer, config.mask_token_id, stops, len(suffix), config.block_length)
        output = self.diffusion_generate(
            input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            step_callback=_chain_callbacks(step_callback, feed),
            generator=generator,
            tokenizer=tokenizer,
            **images,
        )
        if feed is not None:
            feed.finish(output.answer_ids()[0], input_ids)
            streamer.end()
        return output if return_dict else output.sequences

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_layouts: torch.Tensor | None = None,
        image_num_crops: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        step_callback: Callable[[LladaVDiffusionStep], None] | None = None,
        generator: torch.Generator | None = None,
        tokenizer: Any = None,
        **kwargs,
    ) -> torch.LongTensor | LladaVGenerateOutput:
        r"""
        Generate answers by masked diffusion (docs/generation.md; any batch size).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, prompt_length)`): prompts with every image expanded
                to its `image_token_id` tokens (the processor does this), **left**-padded when lengths differ.
            attention_mask (`torch.Tensor` of shape `(batch, prompt_length)`, *optional*): 1 for real tokens, 0
                for left padding. Padded positions are hidden from attention and do not shift positions, so a
                row yields what it yields alone.
            pixel_values, image_sizes, image_layouts, image_num_crops: the images of all rows, in row order (see
                `LladaVModel.get_image_features`). Encoded once per call.
            generation_config (`LladaVGenerationConfig`, *optional*): defaults to `self.generation_config`.
            step_callback (`Callable[[LladaVDiffusionStep], None]`, *optional*): called after every forward pass
                with the logits, predictions, committed positions and canvas (streaming, visualisation).
            generator (`torch.Generator`, *optional*): random source for `temperature > 0` and `"random"`
                remasking.
            tokenizer (*optional*): encodes `stop_strings` and `generation_suffix` (without special tokens).
            kwargs: overrides of `generation_config` fields, e.g. `steps=64, max_new_tokens=64`.

        Returns:
            `torch.LongTensor` `(batch, prompt_length + max_new_tokens + suffix_length)` (see
            [`LladaVGenerateOutput.sequences`]), or a [`LladaVGenerateOutput`] with `return_dict_in_generate=True`.
        """
        # 1. Settings: the generation config with this call's overrides; stops and suffix as ids; the prompt.
        config = self._resolve_generation_config(generation_config, kwargs)
        stop_sequences, suffix = self._stops_and_suffix(config, tokenizer)
        self._check_ids_in_vocab(config, stop_sequences, suffix, self.get_input_embeddings().num_embeddings)
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, config)
        if config.max_length is not None:
            _answer_length_from_max_length(config, input_ids.shape[1])
        # 2. The canvas (prompt | masks | suffix) and the prompt embeddings, images encoded once.
        state = self._prepare_canvas(
            input_ids, attention_mask, suffix, config, pixel_values, image_sizes, image_layouts, image_num_crops
        )
        num_layers = self.config.get_text_config().num_hidden_layers if config.kv_cache else 0
        windows = _DecoderWindows(config, num_layers, state.prompt_len, state.total_len)
        banned = {words[0] for words in config.bad_words_ids or []}
        suppress = torch.tensor(sorted(set(config.suppress_tokens) | banned), dtype=torch.long, device=input_ids.device)
        # 3. Blocks left to right, each denoised in steps; a block starting after every row's stop is skipped.
        for block in range(config.num_blocks):
            if not self._denoise_block(state, block, config, stop_sequences, windows, suppress, generator, step_callback):
                break
        # 4. Prompt | answer up to its stop | suffix | padding.
        return self._finalize(state, suffix, config)

    # ------------------------------------------------------------------ the steps of diffusion_generate

    def _prepare_canvas(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        suffix: list[int],
        config: LladaVGenerationConfig,
        *images: torch.Tensor | None,
    ) -> _DenoisingState:
        """Canvas `prompt | max_new_tokens masks | suffix`, its attention mask and the prompt embeddings.

        Token ids are the state; embeddings are rebuilt from them at every pass (docs/parity.md Q12)."""
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        answer_len, suffix_len = config.max_new_tokens, len(suffix)
        total_len = prompt_len + answer_len + suffix_len
        max_positions = self.config.get_text_config().max_position_embeddings
        if total_len > max_positions:
            raise ValueError(
                f"prompt ({prompt_len}) + max_new_tokens ({answer_len}) + suffix ({suffix_len}) = {total_len} tokens "
                f"exceeds max_position_embeddings ({max_positions})"
            )
        canvas = torch.cat(
            (
                input_ids,
                torch.full((batch, answer_len), config.mask_token_id, dtype=torch.long, device=device),
                torch.tensor(suffix, dtype=torch.long, device=device).expand(batch, suffix_len),
            ),
            dim=1,
        )  # (B, T)
        full_mask = None
        if attention_mask is not None:
            full_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, answer_len + suffix_len)), dim=1)
        return _DenoisingState(
            canvas=canvas,
            attention_mask=full_mask,
            prompt_embeds=self.embed_multimodal(input_ids, *images),  # (B, P, D)
            prompt_len=prompt_len,
            answer_len=answer_len,
            mask_token_id=config.mask_token_id,
            stop_index=[None] * batch,
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            passes_per_row=torch.zeros(batch, dtype=torch.long, device=device),
            columns=torch.arange(total_len, device=device),
        )

    def _denoise_block(
        self,
        state: _DenoisingState,
        block: int,
        config: LladaVGenerationConfig,
        stop_sequences: list[list[int]],
        windows: _DecoderWindows,
        suppress: torch.Tensor,
        generator: torch.Generator | None,
        step_callback: Callable[[LladaVDiffusionStep], None] | None,
    ) -> bool:
        """Denoise one block in at most `steps_per_block` passes. Returns False when every row is finished."""
        block_start = state.prompt_len + block * config.block_length
        block_end = block_start + config.block_length
        for row, stop in enumerate(state.stop_index):
            if stop is not None and state.prompt_len + stop <= block_start:
                state.done[row] = True  # a block at or after a found stop is never decoded (docs/parity.md Q15)
        if bool(state.done.all()):
            return False
        masks = (state.canvas[:, block_start:block_end] == config.mask_token_id).sum(-1)  # (B,)
        schedule = transfer_schedule(masks, config.steps_per_block)  # (B, steps_per_block)
        windows.start_block()
        shortlist = None  # `lm_head_shortlist`: (B, S) ids, built by the block's first pass
        for block_step in range(config.steps_per_block):
            active = _active(state, block_start, block_end)
            if active is None:
                break
            window = windows.plan(active.rows, block_start, block_end)
            logits = self.diffusion_logits(
                state.canvas[active.rows],
                state.prompt_embeds[active.rows],
                active.positions,
                cfg_scale=config.cfg_scale,
                mask_token_id=config.mask_token_id,
                attention_mask=None if state.attention_mask is None else state.attention_mask[active.rows],
                cache=window.cache,
                window=(window.start, window.end),
                vocab_ids=None if shortlist is None else shortlist[active.rows],
            )  # (b, K, V) float32, (b, K, S) over a shortlist
            tokens, confidence = _predict(
                logits, suppress, config, generator, None if shortlist is None else shortlist[active.rows]
            )
            if config.lm_head_shortlist is not None and shortlist is None:
                built = build_shortlist(logits, active.candidate, config.lm_head_shortlist)  # (b, S)
                shortlist = built.new_full((state.canvas.shape[0], built.shape[1]), -1)  # (B, S)
                shortlist.index_copy_(0, active.rows, built)  # rows not stepping now are done for the block
            committed = _commit(
                state.canvas, active, tokens, confidence, schedule[active.rows, block_step], config.confidence_threshold
            )
            state.num_passes += 1
            state.passes_per_row[active.rows] += 1
            copies = 2 if config.cfg_scale > 0 else 1
            state.decoder_tokens += active.rows.shape[0] * copies * (window.end - window.start)
            _update_stops(state, active.rows, stop_sequences)
            if config.output_history:
                state.history.append(state.canvas.clone())
            if step_callback is not None:
                step_callback(
                    LladaVDiffusionStep(
                        step=state.num_passes - 1,
                        block=block,
                        block_step=block_step,
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
        return True

    def diffusion_logits(
        self,
        canvas: torch.Tensor,
        prompt_embeds: torch.Tensor,
        positions: torch.Tensor,
        cfg_scale: float = 0.0,
        mask_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: LladaVDiffusionCache | None = None,
        window: tuple[int, int] | None = None,
        vocab_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoiser pass: float32 logits `(b, K, V)` of the canvas columns `positions`, guided when
        `cfg_scale > 0` (docs/parity.md Q17: the unconditional copy has every prompt position, image
        included, replaced by the mask token and runs in the same forward; `un + (cfg + 1) * (cond - un)`).

        Args:
            canvas: `(b, T)` ids; the first `P` columns are the prompt, whose embeddings are `prompt_embeds`
                `(b, P, D)` (images merged).
            positions: `(K,)` canvas columns to return logits for.
            cfg_scale, mask_token_id: guidance scale and the mask id of the unconditional copy.
            attention_mask: `(b, T)` 1 for tokens, 0 for the prompt's left padding.
            cache, window: with an empty `LladaVDiffusionCache` the full canvas runs and fills it (a refresh);
                with a filled one only the canvas columns `window = (start, end)` (after the prompt) go through
                the decoder, attending over the cache.
            vocab_ids: `(b, S)` ids per row, -1 unused: the logits `(b, K, S)` of these ids only, -inf at the
                unused slots (`lm_head_shortlist`); None: the whole vocabulary.
        """
        prompt_len = prompt_embeds.shape[1]
        cache_kwargs = {} if cache is None else {"cache": cache, "cache_start": window[0]}
        if cache is not None and cache.length > 0:
            start, end = window
            embeds = self.get_input_embeddings()(canvas[:, start:end])  # (b, W, D)
            positions = positions - start  # logits_to_keep is relative to the window
            if cfg_scale > 0:
                embeds = torch.cat((embeds, embeds), dim=0)  # the unconditional copy differs only in the prompt
        else:
            answer_embeds = self.get_input_embeddings()(canvas[:, prompt_len:])  # (b, T - P, D)
            embeds = torch.cat((prompt_embeds, answer_embeds), dim=1)  # (b, T, D)
            if cfg_scale > 0:
                mask_embed = self.get_input_embeddings().weight[mask_token_id].to(prompt_embeds.dtype)  # (D,)
                uncond = torch.cat((mask_embed.expand_as(prompt_embeds), answer_embeds), dim=1)
                embeds = torch.cat((embeds, uncond), dim=0)  # (2b, T, D)
        if cfg_scale > 0 and attention_mask is not None:
            attention_mask = torch.cat((attention_mask, attention_mask), dim=0)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded in these rows: the unmasked path, as the official loop
        if vocab_ids is None:
            logits = self(
                inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=positions, **cache_kwargs
            ).logits.float()
        else:
            # The decoder alone (the forward would apply the full LM head), then the shortlist's rows of it.
            hidden, _ = self.language_model(embeds, attention_mask=attention_mask, **cache_kwargs)  # (b, W, D)
            copies = 2 if cfg_scale > 0 else 1  # the unconditional copy uses the same ids
            rows = self.get_output_embeddings().weight[vocab_ids.clamp(min=0).repeat(copies, 1)]  # (b, S, D)
            logits = torch.einsum("bkd,bsd->bks", hidden[:, positions.to(hidden.device)], rows).float()  # (b, K, S)
        if cfg_scale > 0:
            cond, uncond = logits.chunk(2, dim=0)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        if vocab_ids is not None:
            logits = logits.masked_fill(vocab_ids[:, None, :] < 0, float("-inf"))  # unused slots, after CFG
        return logits

    def _finalize(
        self, state: _DenoisingState, suffix: list[int], config: LladaVGenerationConfig
    ) -> torch.LongTensor | LladaVGenerateOutput:
        sequences, answer_lengths = self._assemble(
            state.canvas, state.stop_index, state.prompt_len, state.answer_len, suffix, config.pad_token_id
        )
        if not config.return_dict_in_generate:
            return sequences
        return LladaVGenerateOutput(
            sequences=sequences,
            answer_lengths=answer_lengths,
            prompt_length=state.prompt_len,
            num_forward_passes=state.num_passes,
            forward_passes_per_row=state.passes_per_row,
            num_decoder_tokens=state.decoder_tokens,
            history=tuple(state.history) if config.output_history else None,
            # A row always takes at least one pass (max_new_tokens >= 1); the clamp only guards the division.
            tokens_per_forward=answer_lengths.float() / state.passes_per_row.clamp(min=1),
        )

    # ------------------------------------------------------------------ settings and checks

    def _stops_and_suffix(self, config: LladaVGenerationConfig, tokenizer: Any) -> tuple[list[list[int]], list[int]]:
        stops = normalize_stop_sequences(config.stop_token_ids)
        needs_tokenizer = [name for name in ("stop_strings", "generation_suffix") if getattr(config, name)]
        if needs_tokenizer and tokenizer is None:
            raise ValueError(f"{' and '.join(needs_tokenizer)} need the `tokenizer` argument to be encoded")
        for text in config.stop_strings or []:
            ids = tokenizer.encode(text, add_special_tokens=False)
            if not ids:
                raise ValueError(f"stop string {text!r} encodes to no tokens")
            stops.append(list(ids))
        eos = config.eos_token_id
        for token in [] if eos is None else [eos] if _is_int(eos) else eos:
            if [token] not in stops:
                stops.append([token])
        if config.generation_suffix:
            suffix = list(tokenizer.encode(config.generation_suffix, add_special_tokens=False))
        else:
            suffix = list(config.suffix_token_ids or [])
        return stops, suffix

    def _check_ids_in_vocab(
        self, config: LladaVGenerationConfig, stops: list[list[int]], suffix: list[int], vocab_size: int
    ) -> None:
        named = {
            "mask_token_id": [config.mask_token_id],
            "pad_token_id": [config.pad_token_id],
            "suppress_tokens": list(config.suppress_tokens),
            "stop sequences": [i for seq in stops for i in seq],
            "suffix": suffix,
        }
        for name, ids in named.items():
            bad = sorted({i for i in ids if not 0 <= i < vocab_size})
            if bad:
                raise ValueError(f"{name} contain ids outside the vocabulary (0..{vocab_size - 1}): {bad}")
        if config.mask_token_id in suffix:
            raise ValueError(f"the suffix {suffix} contains the mask id {config.mask_token_id}")

    def _check_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: LladaVGenerationConfig
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an int64 tensor of shape (batch, prompt_length), got {shape}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one prompt token per row")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
            attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
            # Left padding only: once a row's tokens start, they continue to the end of the prompt.
            right_padded = (attention_mask[:, 1:] < attention_mask[:, :-1]).any(-1)
            empty = attention_mask.sum(-1) == 0
            if bool(right_padded.any()) or bool(empty.any()):
                bad = (right_padded | empty).nonzero().flatten().tolist()
                raise ValueError(
                    f"rows {bad} of attention_mask are not left-padded prompts (padding must come first and every "
                    "row needs a token); the answer is appended after the last prompt column"
                )
            real = attention_mask.bool()
        else:
            real = torch.ones_like(input_ids, dtype=torch.bool)
        has_mask = ((input_ids == config.mask_token_id) & real).any(-1)
        if bool(has_mask.any()):
            raise ValueError(
                f"prompt rows {has_mask.nonzero().flatten().tolist()} contain the mask id {config.mask_token_id}; "
                "the sampler would treat them as positions to generate"
            )
        return input_ids, attention_mask

    @staticmethod
    def _assemble(
        canvas: torch.Tensor,
        stop_index: list[int | None],
        prompt_len: int,
        answer_len: int,
        suffix: list[int],
        pad_token_id: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt, answer up to the stop, suffix, then padding (the official return value after the prompt)."""
        batch = canvas.shape[0]
        sequences = torch.full_like(canvas, pad_token_id)
        sequences[:, :prompt_len] = canvas[:, :prompt_len]
        lengths = []
        suffix_t = torch.tensor(suffix, dtype=canvas.dtype, device=canvas.device)
        for row in range(batch):
            n = answer_len if stop_index[row] is None else stop_index[row]
            sequences[row, prompt_len : prompt_len + n] = canvas[row, prompt_len : prompt_len + n]
            sequences[row, prompt_len + n : prompt_len + n + len(suffix)] = suffix_t
            lengths.append(n)
        return sequences, torch.tensor(lengths, dtype=torch.long, device=canvas.device)


__all__ = [
    "LladaVDiffusionCache",
    "LladaVGenerationConfig",
    "LladaVGenerationMixin",
    "LladaVGenerateOutput",
    "LladaVDiffusionStep",
    "transfer_schedule",
    "sample_tokens",
    "token_confidence",
    "select_top_k",
    "filter_top_k_top_p",
    "find_stop",
    "normalize_stop_sequences",
    "resolve_generation_config",
]
