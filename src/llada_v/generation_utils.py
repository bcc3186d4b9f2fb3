"""Masked-diffusion generation for LLaDA-V: `LladaVGenerationMixin.diffusion_generate` (and `generate`).

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

Fast decoding (`kv_cache`, `confidence_threshold`, `lm_head_shortlist`, the `LladaVGenerationConfig.fast`
preset) is opt-in and approximate; exact mode stays the default. What each option changes and costs:
docs/generation.md#fast-decoding-opt-in. So is `dllm_cache` (dLLM-Cache, the official demo's acceleration,
`dllm_cache_llada_v`): its passes run the active rows in groups that share a refresh decision
(`_feature_cached_logits`).

The call reads top to bottom as named steps: `start_denoising` (settings, canvas, prompt embeddings) returns a
`LladaVDenoisingRun` (`denoising_llada_v`), which `diffusion_generate` steps one forward pass at a time: finished
rows (`_finish_rows`), active rows and columns (`_active`), the decoder window (`DecoderWindows.plan`), logits
(`diffusion_logits`), predictions and commits (`DiffusionSampler`), stops (`_update_stops`); finally the output
(`_assemble`). Runs that join and leave between passes share forwards in a `LladaVDenoisingBatch` (`shared_logits`).
Its parts have their own remote-code files: the pass-by-pass state (`denoising_llada_v`), the settings
(`generation_config_llada_v`), the pure maths (`sampling_llada_v`), the key/value cache (`cache_llada_v`) and
dLLM-Cache (`dllm_cache_llada_v`);
the names users import from this module (`LladaVGenerationConfig`, `LladaVDiffusionCache`, the sampling
functions) are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput, logging

from .cache_llada_v import DecoderWindows, LladaVDiffusionCache
from .compat_llada_v import GenerationConfig
from .denoising_llada_v import (
    LladaVDenoisingBatch,
    LladaVDenoisingRun,
    LladaVDiffusionStep,
    _Active,
    _DenoisingState,
    answer_length,
)
from .dllm_cache_llada_v import FeatureCacheView, LladaVFeatureCache, dllm_cache_settings
from .generation_config_llada_v import (
    FAST_DECODING_PRESET,
    LladaVGenerationConfig,
    _is_int,
    fit_schedule,
    is_diffusion_config,
    normalize_stop_sequences,
    resolve_generation_config,
    schedule_for_length,
    special_id_settings,
)
from .sampling_llada_v import (
    ClassifierFreeGuidance,
    DiffusionSampler,
    build_shortlist,
    filter_top_k_top_p,
    find_stop,
    sample_tokens,
    select_top_k,
    token_confidence,
    transfer_schedule,
)

logger = logging.get_logger(__name__)

# The image inputs of `LladaVModel` (what the processor returns besides the text), passed on by `generate`.
_IMAGE_INPUTS = ("pixel_values", "image_sizes", "image_layouts", "image_num_crops")


def check_canvas_length(prompt_length: int, max_new_tokens: int, suffix_length: int, max_positions: int) -> None:
    """`ValueError` naming the lengths when prompt + answer canvas + suffix exceed the model's positions (the
    check `diffusion_generate` runs; a server runs it before queueing a request)."""
    total = prompt_length + max_new_tokens + suffix_length
    if total > max_positions:
        raise ValueError(
            f"prompt ({prompt_length}) + max_new_tokens ({max_new_tokens}) + suffix ({suffix_length}) = {total} "
            f"tokens exceeds max_position_embeddings ({max_positions})"
        )


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


def _answer_length_from_max_length(config: LladaVGenerationConfig, prompt_length: int) -> None:
    """`max_length` counts prompt and answer: the answer gets the rest (this call's config is a copy)."""
    max_length = config.max_length
    answer = max_length - prompt_length
    if answer < 1:
        raise ValueError(f"max_length ({max_length}) leaves no room after the prompt ({prompt_length} tokens)")
    config.max_new_tokens = answer
    config.max_length = None  # the answer length is set now
    try:
        config.validate()
    except ValueError as err:
        raise ValueError(f"max_length ({max_length}) - prompt ({prompt_length}) = {answer} new tokens: {err}") from None


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

    def _fit_schedule_to_length(self, generation_config: GenerationConfig | None, kwargs: dict) -> dict:
        """`generate(max_new_tokens=N)` without `steps`/`block_length`: a schedule that fits N
        (`schedule_for_length`), said in a warning when the configured one did not fit."""
        base = generation_config if generation_config is not None and is_diffusion_config(generation_config) else None
        base = base or getattr(self, "generation_config", None) or LladaVGenerationConfig.from_model_config(self.config)
        fitted = schedule_for_length(base, kwargs)
        filled = [key for key in ("steps", "block_length") if fitted is not kwargs and key not in kwargs]
        if any(fitted[key] != getattr(base, key) for key in filled):
            logger.warning(
                f"max_new_tokens={fitted['max_new_tokens']}: the configured schedule (steps={base.steps}, "
                f"block_length={base.block_length}) does not fit, using steps={fitted['steps']}, "
                f"block_length={fitted['block_length']}; pass steps and block_length to choose"
            )
        return fitted

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
                `kwargs` that are fields of it override it (`max_new_tokens=64, steps=64`). A `max_new_tokens`
                without `steps`/`block_length` keeps the configured schedule when it fits, else uses one that does
                (`schedule_for_length`; a warning names it), as the pipeline and the command line do.
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
        kwargs = self._fit_schedule_to_length(generation_config, kwargs)
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
        run = self.start_denoising(
            input_ids, attention_mask, pixel_values, image_sizes, image_layouts, image_num_crops,
            generation_config=generation_config, step_callback=step_callback, generator=generator,
            tokenizer=tokenizer, **kwargs,
        )  # fmt: skip
        while run.step():  # blocks left to right, each denoised in passes; stops once every row is finished
            pass
        return run.finalize()  # prompt | answer up to its stop | suffix | padding

    @torch.no_grad()
    def start_denoising(
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
    ) -> LladaVDenoisingRun:
        """`diffusion_generate`'s call as a `LladaVDenoisingRun` that has run no pass yet: the settings checked,
        the canvas built, the prompt and its images encoded. Same arguments as `diffusion_generate`; drive it with
        `run.step()` (one forward pass) until it returns False, then `run.finalize()`, or let several runs share
        forwards in a `LladaVDenoisingBatch`."""
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
        # 3. What the passes use: the decoder windows (kv_cache), dLLM-Cache, the sampler.
        feature_cache = None  # dLLM-Cache
        if config.dllm_cache is not None:
            layers = self.config.get_text_config().num_hidden_layers
            settings = dllm_cache_settings(config.dllm_cache)
            feature_cache = LladaVFeatureCache(settings, state.canvas.shape[0], layers, state.prompt_len)
        num_layers = self.config.get_text_config().num_hidden_layers if config.kv_cache else 0
        windows = DecoderWindows(config, num_layers, state.prompt_len, state.total_len)
        banned = {words[0] for words in config.bad_words_ids or []}
        suppress = torch.tensor(sorted(set(config.suppress_tokens) | banned), dtype=torch.long, device=input_ids.device)
        sampler = DiffusionSampler(config, suppress, input_ids.shape[0], generator)
        return LladaVDenoisingRun(
            self, state, config, stop_sequences, suffix, windows, sampler, feature_cache, step_callback
        )

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
        check_canvas_length(prompt_len, answer_len, suffix_len, self.config.get_text_config().max_position_embeddings)
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

    def _feature_cached_logits(
        self,
        state: _DenoisingState,
        active: _Active,
        feature_cache: LladaVFeatureCache,
        sampler: DiffusionSampler,
    ) -> tuple[torch.Tensor, int]:
        """One dLLM-Cache pass: the active rows in groups sharing a refresh decision (each row's clock counts the
        passes it took part in), one decoder call per group. Returns the logits `(b, K, V)` in row order and the
        query positions the decoder computed."""
        parts, tokens = [], 0
        for index, view in feature_cache.groups(active.rows, state.passes_per_row[active.rows]):
            rows = active.rows[index]
            logits = self.diffusion_logits(
                state.canvas[rows],
                state.prompt_embeds[rows],
                active.positions,
                attention_mask=None if state.attention_mask is None else state.attention_mask[rows],
                vocab_ids=sampler.vocab_ids(rows),
                feature_cache=view,
            )
            parts.append((index, logits))
            tokens += rows.shape[0] * view.decoder_tokens(state.total_len)
        if len(parts) == 1:
            return parts[0][1], tokens
        out = parts[0][1].new_empty((active.rows.shape[0], *parts[0][1].shape[1:]))
        for index, logits in parts:
            out[index] = logits
        return out, tokens

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
        feature_cache: FeatureCacheView | None = None,
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
            feature_cache: a dLLM-Cache view of these rows (`dllm_cache_llada_v.FeatureCacheView`); the full canvas
                runs, each layer reusing what the view allows.
        """
        guidance = ClassifierFreeGuidance(cfg_scale)
        prompt_len = prompt_embeds.shape[1]
        cache_kwargs = {} if cache is None else {"cache": cache, "cache_start": window[0]}
        if feature_cache is not None:
            cache_kwargs["feature_cache"] = feature_cache
        if cache is not None and cache.length > 0:
            start, end = window
            embeds = self.get_input_embeddings()(canvas[:, start:end])  # (b, W, D)
            positions = positions - start  # logits_to_keep is relative to the window
            embeds = guidance.double(embeds)  # the unconditional copy differs only in the (cached) prompt
        else:
            embeds = self._canvas_embeds(canvas, prompt_embeds)  # (b, T, D)
            if guidance.enabled:
                mask_embed = self.get_input_embeddings().weight[mask_token_id].to(prompt_embeds.dtype)  # (D,)
                uncond = torch.cat((mask_embed.expand_as(prompt_embeds), embeds[:, prompt_len:]), dim=1)
                embeds = guidance.double(embeds, uncond)  # (2b, T, D)
        if attention_mask is not None:
            attention_mask = guidance.double(attention_mask)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded in these rows: the unmasked path, as the official loop
        if vocab_ids is None:
            logits = self(
                inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=positions, **cache_kwargs
            ).logits.float()
        else:
            # The decoder alone (the forward would apply the full LM head), then the shortlist's rows of it.
            hidden, _ = self.language_model(embeds, attention_mask=attention_mask, **cache_kwargs)  # (b, W, D)
            ids = guidance.double(vocab_ids.clamp(min=0))  # the unconditional copy uses the same ids
            rows = self.get_output_embeddings().weight[ids]  # (b, S, D)
            logits = torch.einsum("bkd,bsd->bks", hidden[:, positions.to(hidden.device)], rows).float()  # (b, K, S)
        logits = guidance.combine(logits)
        if vocab_ids is not None:
            logits = logits.masked_fill(vocab_ids[:, None, :] < 0, float("-inf"))  # unused slots, after CFG
        return logits

    def _canvas_embeds(self, canvas: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """`(b, T, D)`: the prompt's embeddings `(b, P, D)` (images merged), then those of the canvas ids after it."""
        answer_embeds = self.get_input_embeddings()(canvas[:, prompt_embeds.shape[1] :])  # (b, T - P, D)
        return torch.cat((prompt_embeds, answer_embeds), dim=1)

    @torch.no_grad()
    def shared_logits(self, parts: list[tuple[_DenoisingState, _Active]]) -> list[torch.Tensor]:
        """Plain full-forward passes of several runs (no cache, guidance or shortlist) in one decoder call.

        Each part's rows are left-padded to the longest canvas, the padding hidden from attention and not counted
        in positions, as in a left-padded `diffusion_generate` batch. Returns each part's float32 logits
        `(b, K, V)` at its own columns, what its own `diffusion_logits` call gives (up to the rounding of a
        larger batch)."""
        length = max(state.total_len for state, _ in parts)
        embeds, masks, pads = [], [], []
        for state, active in parts:
            rows_embeds = self._canvas_embeds(state.canvas[active.rows], state.prompt_embeds[active.rows])  # (b, T', D)
            if state.attention_mask is None:
                mask = torch.ones(rows_embeds.shape[:2], dtype=torch.long, device=rows_embeds.device)
            else:
                mask = state.attention_mask[active.rows]
            pad = length - rows_embeds.shape[1]
            embeds.append(torch.nn.functional.pad(rows_embeds, (0, 0, pad, 0)))
            masks.append(torch.nn.functional.pad(mask, (pad, 0)))
            pads.append(pad)
        attention_mask = torch.cat(masks)  # (N, length)
        if bool(attention_mask.all()):
            attention_mask = None  # nothing padded: the unmasked path, as diffusion_logits
        hidden, _ = self.language_model(torch.cat(embeds), attention_mask=attention_mask)  # (N, length, D)
        logits, first = [], 0
        for (_, active), pad in zip(parts, pads):
            rows = active.rows.shape[0]
            logits.append(self._kept_logits(hidden[first : first + rows], active.positions + pad))  # (b, K, V)
            first += rows
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
            n = answer_length(stop_index[row], answer_len)
            sequences[row, prompt_len : prompt_len + n] = canvas[row, prompt_len : prompt_len + n]
            sequences[row, prompt_len + n : prompt_len + n + len(suffix)] = suffix_t
            lengths.append(n)
        return sequences, torch.tensor(lengths, dtype=torch.long, device=canvas.device)


__all__ = [
    "LladaVGenerationMixin",
    "LladaVGenerateOutput",
    "LladaVDiffusionStep",
    "check_canvas_length",
    "LladaVDenoisingBatch",
    "LladaVDenoisingRun",
    # Re-exported from their own modules, so `from .generation_utils import X` keeps working.
    "FAST_DECODING_PRESET",
    "LladaVDiffusionCache",
    "LladaVGenerationConfig",
    "build_shortlist",
    "filter_top_k_top_p",
    "find_stop",
    "fit_schedule",
    "is_diffusion_config",
    "normalize_stop_sequences",
    "resolve_generation_config",
    "sample_tokens",
    "schedule_for_length",
    "select_top_k",
    "special_id_settings",
    "token_confidence",
    "transfer_schedule",
]
