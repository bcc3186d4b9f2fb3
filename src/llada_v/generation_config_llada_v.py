"""The settings of LLaDA-V's masked-diffusion sampler: `LladaVGenerationConfig` and its validation.

Saved as and loaded from `generation_config.json`; the defaults are the released demo settings and the special
ids follow the model config (`special_id_settings`). Every setting is checked at construction and raises a
`ValueError` naming the values; what each one does is in docs/generation.md#settings-lladavgenerationconfig.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from .compat_llada_v import GenerationConfig
from .configuration_llada_v import LladaVConfig
from .dllm_cache_llada_v import dllm_cache_settings

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
            to `diffusion_generate` (without special tokens) and searched as ids after `stop_token_ids` (once a
            stop is found only the first criterion is searched again, docs/parity.md Q15). The decoded text may
            therefore still hold a stop string; `llada_v.inference.cut_at_stop_strings` ends it before the first
            one, as OpenAI clients expect (docs/generation.md#stop-strings).
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

        Fast decoding: opt-in and approximate; with the defaults below the sampler is the exact one above. What
        each setting approximates and when it is still exact: docs/generation.md#accelerations.

        kv_cache (`str`, *optional*, defaults to None): `"dual"` or `"prefix"`: the first pass of every block
            stores every layer's keys/values, the other passes run only the block (`"prefix"`: the block and
            everything after it) through the decoder (docs/generation.md#keyvalue-cache-kv_cache).
        kv_cache_prompt_refresh (`str`, defaults to `"block"`): with `kv_cache`, whether the prompt goes through the
            decoder at every block start (`"block"`) or only in the call's first pass (`"once"`)
            (docs/generation.md#prompt-refresh-kv_cache_prompt_refresh).
        confidence_threshold (`float`, *optional*, defaults to None): a step also commits every candidate whose
            confidence is strictly above this value, in (0, 1]; needs `remasking="low_confidence"`
            (docs/generation.md#confidence-threshold-confidence_threshold).
        lm_head_shortlist (`int`, *optional*, defaults to None): a block's later passes compute the LM head only
            over each row's ids among the `lm_head_shortlist` likeliest of its first pass; needs `temperature=0`
            and `remasking="low_confidence"` (docs/generation.md#lm-head-shortlist-lm_head_shortlist).
        dllm_cache (`dict`, *optional*, defaults to None): dLLM-Cache, the released demo's default acceleration:
            `{"prompt_interval_steps": P, "gen_interval_steps": G, "transfer_ratio": R}` (`{}`: the official
            25/7/0.25); every layer caches its features, a row's pass recomputes the prompt every P passes, the
            answer every G passes and in between the share R of the answer whose values moved most; not with
            `kv_cache` or `cfg_scale > 0` (dllm_cache_llada_v.py, docs/generation.md#dllm-cache-opt-in).

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
        "dllm_cache": None,
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
    def from_model_config(cls, model_config) -> LladaVGenerationConfig:
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
        self._check_dllm_cache()

    def _check_dllm_cache(self) -> None:
        if dllm_cache_settings(self.dllm_cache) is None:
            return
        if self.kv_cache is not None:
            raise ValueError(
                f"dllm_cache ({self.dllm_cache}) and kv_cache={self.kv_cache!r} are two caches of the same layer "
                "features with different refresh rules; choose one"
            )
        if self.cfg_scale > 0:
            raise ValueError(
                f"dllm_cache ({self.dllm_cache}) is not supported with cfg_scale={self.cfg_scale} (classifier-free "
                "guidance); set cfg_scale=0 or dllm_cache=None"
            )

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
    def fast(cls, base: GenerationConfig | None = None, **overrides) -> LladaVGenerationConfig:
        """The recommended fast decoding settings on top of `base` (default: the released defaults).

        `kv_cache="dual"` + `confidence_threshold=0.9` (Fast-dLLM's settings); every other field, including
        `steps`, comes from `base`, then `overrides` win. Use the model's own config as the
        base so its special ids are kept:

            config = LladaVGenerationConfig.fast(model.generation_config, block_length=32)
            model.diffusion_generate(input_ids, generation_config=config)

        The result approximates exact decoding (docs/generation.md#fast-decoding-opt-in). With `steps` equal to
        `max_new_tokens` (the demo default) a step commits at least one token; fewer steps raise that minimum.
        """
        config, unknown = resolve_generation_config(
            cls() if base is None else base, {**FAST_DECODING_PRESET, **overrides}
        )
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


def fit_schedule(max_new_tokens: int, steps: int, block_length: int) -> tuple[int, int]:
    """`(steps, block_length)` kept when they fit `max_new_tokens`, else the one-block, one-token-per-step
    schedule of the released demo (`steps = block_length = max_new_tokens`) for the part that does not fit.
    An invalid length is returned unchanged (validation reports it)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        return steps, block_length
    if block_length <= 0 or max_new_tokens % block_length:
        block_length = max_new_tokens
    num_blocks = max_new_tokens // block_length
    if steps <= 0 or steps > max_new_tokens or steps % num_blocks:
        steps = max_new_tokens
    return steps, block_length


def schedule_for_length(base: GenerationConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` of `base` in which a changed `max_new_tokens` brings `steps`/`block_length` that fit it: the
    ones given, else `base`'s when they fit, else `fit_schedule`'s. The one rule of every entry point that takes
    a length alone (`generate`, the pipeline, the CLI, the server, lmms-eval); `diffusion_generate` stays strict."""
    if overrides.get("max_new_tokens") is None:
        return overrides
    defaults = LladaVGenerationConfig._diffusion_defaults
    steps, block = fit_schedule(
        overrides["max_new_tokens"],
        overrides.get("steps", getattr(base, "steps", defaults["steps"])),
        overrides.get("block_length", getattr(base, "block_length", defaults["block_length"])),
    )
    return {"steps": steps, "block_length": block, **overrides}


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


__all__ = [
    "AUTOREGRESSIVE_ONLY",
    "DEFAULT_ANSWER_LENGTH",
    "FAST_DECODING_PRESET",
    "KV_CACHE_MODES",
    "LladaVGenerationConfig",
    "PROMPT_REFRESH_MODES",
    "REMASKING_STRATEGIES",
    "fit_schedule",
    "is_diffusion_config",
    "normalize_stop_sequences",
    "resolve_generation_config",
    "schedule_for_length",
    "special_id_settings",
]
