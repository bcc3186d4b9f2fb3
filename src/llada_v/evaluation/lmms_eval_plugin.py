"""lmms-eval model plugin `llada_v`: LLaDA-V evaluated with its masked-diffusion sampler and likelihood.

    pip install 'llada-v[eval]'      # lmms-eval 0.7.3 (see docs/evaluation.md for a CPU-only install)
    python -m lmms_eval --model llada_v --model_args pretrained=PATH_OR_ID[,dtype=bfloat16,...] \
        --tasks chartqa --batch_size 8

lmms-eval finds the model through the `lmms_eval.models` entry point of this package (`manifest`).

- `generate_until`: any batch size (prompts left-padded; at temperature 0 each row gives what it gives alone).
  The diffusion schedule comes from the official per-task settings (docs/evaluation.md) when the task is known
  (`TASK_PRESETS`), else from the task's `max_new_tokens` with one token per step in one block (the released
  demo's shape, 128/128/128 when the task sets nothing). `<|eot_id|>` always stops the sampler; so do the
  preset's stop strings (ChartQA: "\n"), or, for a task without a preset, its `until` strings. The task's `until`
  always cuts the decoded text. Diffusion knobs can be set per run with
  `--gen_kwargs steps=..,block_length=..,gen_length=..,cfg_scale=..,remasking=..,temperature=..`.
- `loglikelihood`: LLaDA's Monte-Carlo estimate of the masked-diffusion likelihood bound. For each of `mc_num`
  samples, a number of masked tokens `k` is drawn uniformly from 1..L (stratified over the samples), `k` random
  continuation tokens are masked, and the cross-entropy summed over them is weighted by `L / k` (= 1/t); the
  log-likelihood is minus the average. Fixed seed per request, so results do not depend on batching or order.
  `is_greedy` is the sampler's greedy answer (one token per step) compared with the continuation.

Model arguments: `pretrained`, `processor`, `device`, `dtype`, `batch_size`, `load_in_4bit`, `load_in_8bit`,
`attn_implementation`, `fast` (the fast-decoding preset), `dllm_cache` (dLLM-Cache, the official demo's acceleration:
`true` for the official 25/7/0.25, or `P/G/R` = prompt interval / answer interval / transfer ratio), `task_presets`
(default True), `cfg_scale`,
`system_prompt`, `mc_num` (128), `mc_batch_size` (32), `check_greedy` (True), `seed` (1234), `adapter` (a PEFT
LoRA folder applied to `pretrained`), `progress` (a bar over the requests on the first process; default: only when
stderr is a terminal). The yes/no arguments (`load_in_4bit`, `load_in_8bit`, `fast`, `task_presets`, `check_greedy`,
`progress`) take yes/no, true/false or 1/0 in any case; any other value is refused with the argument's name.
"""

from __future__ import annotations

import copy
import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..arguments import parse_bool, tqdm_disable
from ..dllm_cache_llada_v import dllm_cache_settings
from ..inference import (
    InputError,
    chat_prompt,
    fit_schedule,
    generate_texts,
    generation_config_for,
    load_pretrained,
    prepare_inputs,
    user_message,
)

try:
    from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
    from lmms_eval.api.model import lmms

    HAS_LMMS_EVAL = True
except ImportError:  # lmms-eval is optional: the plugin's logic stays importable and testable without it
    HAS_LMMS_EVAL = False
    Instance = Any

    @dataclass
    class TokenCounts:  # the fields of lmms_eval.api.instance.TokenCounts that this plugin fills
        input_tokens: int | None = None
        output_tokens: int | None = None
        reasoning_tokens: int | None = None

    @dataclass
    class GenerationResult:  # lmms_eval.api.instance.GenerationResult
        text: Any
        token_counts: TokenCounts | None = None

    class _NoCache:
        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            pass

    class lmms:  # noqa: N801 - the minimal state of lmms_eval.api.model.lmms that this plugin reads
        is_simple = True

        def __init__(self) -> None:
            self._rank, self._world_size = 0, 1
            self.cache_hook = _NoCache()
            self.task_dict: dict = {}


DEFAULT_GENERATION = 128  # the released demo: gen 128 / steps 128 / block 128, stop <|eot_id|>


@dataclass(frozen=True)
class DiffusionPreset:
    """One row of the official evaluation settings (docs/evaluation.md)."""

    max_new_tokens: int
    steps: int
    block_length: int
    stop_strings: tuple[str, ...] = field(default_factory=tuple)


MULTIPLE_CHOICE = DiffusionPreset(2, 2, 2)
# Official per-task settings (docs/evaluation.md), matched against the lmms-eval task name: the first entry whose key
# is a prefix of the task name wins (so `chartqa_lite`, `docvqa_val`, `mathvista_testmini` are covered). The
# multiple-choice family is our reading of "multiple choice 2/2/2": the benchmarks whose answer is an option
# letter (or yes/no).
TASK_PRESETS: tuple[tuple[str, DiffusionPreset], ...] = (
    ("chartqa", DiffusionPreset(16, 16, 16, ("\n",))),
    ("docvqa", DiffusionPreset(32, 16, 32)),
    ("mathvista", DiffusionPreset(96, 48, 96)),
    ("mathverse", DiffusionPreset(64, 32, 64)),
    ("ai2d", MULTIPLE_CHOICE),
    ("mmbench", MULTIPLE_CHOICE),
    ("mmmu", MULTIPLE_CHOICE),
    ("mmstar", MULTIPLE_CHOICE),
    ("muirbench", MULTIPLE_CHOICE),
    ("realworldqa", MULTIPLE_CHOICE),
    ("scienceqa", MULTIPLE_CHOICE),
    ("seedbench", MULTIPLE_CHOICE),
    ("blink", MULTIPLE_CHOICE),
)
# gen_kwargs keys read as sampler settings; `max_new_tokens` and `until` are handled separately and every other key
# (do_sample, top_p, num_beams, image_aspect_ratio, ...) is an autoregressive or model-specific knob without meaning here.
SAMPLER_KWARGS = ("steps", "block_length", "temperature", "remasking", "cfg_scale")


def task_preset(task: str) -> DiffusionPreset | None:
    """The official setting for an lmms-eval task name, or None."""
    name = task.lower()
    for prefix, preset in TASK_PRESETS:
        if name.startswith(prefix):
            return preset
    return None


def dllm_cache_arg(value: bool | str | dict | None) -> dict | None:
    """The `dllm_cache` model argument: off (None, false), the official defaults (true), `"P/G/R"` (lmms-eval
    splits model_args at commas, hence the slashes) or a dict of the settings; checked at once."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("", "false", "none")):
        return None
    if value is True or (isinstance(value, str) and value.lower() == "true"):
        return {}
    if isinstance(value, str):
        parts = value.split("/")
        try:
            if len(parts) != 3:
                raise ValueError
            value = {"prompt_interval_steps": int(parts[0]), "gen_interval_steps": int(parts[1]),
                     "transfer_ratio": float(parts[2])}  # fmt: skip
        except ValueError:
            raise ValueError(
                f"llada_v: dllm_cache takes true, false or PROMPT_INTERVAL/GEN_INTERVAL/TRANSFER_RATIO (e.g. "
                f"25/7/0.25), got {value!r}"
            ) from None
    try:
        dllm_cache_settings(value)
    except ValueError as err:
        raise ValueError(f"llada_v: {err}") from None
    return value


def resolve_generation(
    task: str, gen_kwargs: dict[str, Any], use_presets: bool = True
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Sampler overrides, sampler stop strings and text cut strings for one request group.

    Precedence, lowest first: the demo default (128/128/128); the task's `max_new_tokens` (steps and block follow
    it, one token per step); the official per-task preset (`TASK_PRESETS`, when `use_presets`); explicit diffusion
    keys in `gen_kwargs` (`gen_length`, `steps`, `block_length`, `temperature`, `remasking`, `cfg_scale`).

    Stops: with a preset the sampler stops on the preset's strings only (the official settings; a task's `until`
    would change which steps run), without one on the task's `until`. The decoded text is cut at both.
    """
    until = gen_kwargs.get("until")
    if until is None:
        stops: list[str] = []
    elif isinstance(until, str):
        stops = [until]
    elif isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        stops = list(until)
    else:
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, got {until!r}")

    length = int(gen_kwargs.get("max_new_tokens") or DEFAULT_GENERATION)
    steps, block = length, length
    preset = task_preset(task) if use_presets else None
    sampler_stops = stops
    if preset is not None:
        length, steps, block = preset.max_new_tokens, preset.steps, preset.block_length
        sampler_stops = list(preset.stop_strings)
        stops = [*preset.stop_strings, *[s for s in stops if s not in preset.stop_strings]]
    if gen_kwargs.get("gen_length") is not None:
        length = int(gen_kwargs["gen_length"])
        steps, block = fit_schedule(
            length, int(gen_kwargs.get("steps", steps)), int(gen_kwargs.get("block_length", block))
        )
    overrides: dict[str, Any] = {"max_new_tokens": length, "steps": steps, "block_length": block}
    for key in SAMPLER_KWARGS:
        if gen_kwargs.get(key) is not None:
            overrides[key] = gen_kwargs[key]
    for key in ("steps", "block_length"):
        overrides[key] = int(overrides[key])
    if "temperature" in overrides:
        overrides["temperature"] = float(overrides["temperature"])
    return overrides, [s for s in sampler_stops if s], [s for s in stops if s]


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (lmms-eval's `until` contract)."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


class ContinuationScore(NamedTuple):
    """`LladaV.score`'s result: the estimated log-likelihood of the continuation (summed over its tokens), whether
    the sampler's greedy answer is the continuation, and the continuation's token count."""

    log_likelihood: float
    is_greedy: bool
    num_tokens: int

    @property
    def loss(self) -> float:
        """Minus the log-likelihood per continuation token: what `loglikelihood` returns to lmms-eval."""
        return -self.log_likelihood / max(1, self.num_tokens)


class LoglikelihoodResult(GenerationResult):
    """`(loss, is_greedy)` as `loglikelihood` returns it: unpacks and indexes like the 2-tuple.

    The first value is a **loss**, minus the estimated log-likelihood per continuation token: lmms-eval 0.7.3
    ranks the options of a `multiple_choice` task with `np.argmin` ("we just use the argmin here", its models
    return their loss), so a log-likelihood would rank the worst option first.

    Why not a plain tuple: lmms-eval 0.7.3's evaluator passes every model output through
    `unwrap_generation_output`, which turns any tuple that does not start with a string into `str(tuple)`, so
    `multiple_choice` tasks then fail with "too many values to unpack". A `GenerationResult` is unwrapped to its
    `text`, which here is the tuple itself.
    """

    def __init__(self, loss: float, is_greedy: bool) -> None:
        super().__init__(text=(float(loss), bool(is_greedy)))

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, index: int) -> Any:
        return self.text[index]

    def __len__(self) -> int:
        return 2

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LoglikelihoodResult):
            return self.text == other.text
        return isinstance(other, tuple) and self.text == other

    __hash__ = None  # mutable, like the dataclass it extends

    def __repr__(self) -> str:
        return f"LoglikelihoodResult{self.text!r}"


def _flatten_visuals(visuals: Any) -> list:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    flat = []
    for item in visuals:
        flat.extend(_flatten_visuals(item) if isinstance(item, (list, tuple)) else [item])
    return flat


class LladaV(lmms):
    """LLaDA-V for lmms-eval (simple model interface: context strings + `doc_to_visual`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        attn_implementation: str | None = None,
        fast: bool = False,
        dllm_cache: bool | str | dict | None = None,
        task_presets: bool = True,
        cfg_scale: float | None = None,
        system_prompt: str | None = None,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        check_greedy: bool = True,
        seed: int = 1234,
        max_batch_size: int | None = None,
        adapter: str | None = None,
        progress: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"llada_v: unknown model_args {sorted(kwargs)}")
        # lmms-eval hands model_args over as parsed text: `fast=no` arrives as the string "no" (true for bool()).
        try:
            load_in_4bit = parse_bool("load_in_4bit", load_in_4bit)
            load_in_8bit = parse_bool("load_in_8bit", load_in_8bit)
            fast, task_presets = parse_bool("fast", fast), parse_bool("task_presets", task_presets)
            check_greedy = parse_bool("check_greedy", check_greedy)
            progress = None if progress is None else parse_bool("progress", progress)
        except ValueError as err:
            raise ValueError(f"llada_v: model_args {err}") from None
        if load_in_4bit and load_in_8bit:
            raise ValueError("llada_v: load_in_4bit and load_in_8bit exclude each other")
        if str(batch_size).startswith("auto"):
            raise ValueError("llada_v: batch_size=auto is not supported; give a number")
        self.dllm_cache = dllm_cache_arg(dllm_cache)  # checked before the weights are read
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1 or int(mc_num) < 1 or int(mc_batch_size) < 1:
            raise ValueError(
                f"llada_v: batch_size ({batch_size}), mc_num ({mc_num}) and mc_batch_size "
                f"({mc_batch_size}) must be positive"
            )

        device = self._join_processes(device)
        quantization = "4bit" if load_in_4bit else "8bit" if load_in_8bit else None
        self.model, self.processor = load_pretrained(
            pretrained, processor, dtype=dtype, device=device or "auto", quantization=quantization,
            attn_implementation=attn_implementation, adapter=adapter,
        )  # fmt: skip
        self.tokenizer = self.processor.tokenizer
        # A bar over the requests on the first process, only on a terminal unless progress=true/false says.
        self.progress_disable = True if self._rank != 0 else tqdm_disable(progress)
        self.fast = fast
        self.task_presets = task_presets
        self.cfg_scale = cfg_scale
        self.system_prompt = system_prompt
        self.mc_num, self.mc_batch_size = int(mc_num), int(mc_batch_size)
        self.check_greedy = check_greedy
        self.seed = int(seed)
        self._prompt_cache: tuple[Any, Any] | None = None

    def _join_processes(self, device: str | None) -> str | None:
        """Under `accelerate launch`: this process's rank, world size and device (data parallel); else `device`."""
        from accelerate import Accelerator

        accelerator = Accelerator()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != launched:
            # Each process would evaluate every request and the evaluator's gathers would fail.
            raise ValueError(
                f"llada_v: {launched} processes were launched (WORLD_SIZE) but accelerate runs "
                f"{accelerator.num_processes} ({accelerator.distributed_type}); without GPUs launch with "
                "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m lmms_eval ...`"
            )
        if accelerator.num_processes > 1:
            # Data parallel: each process evaluates on its accelerator's device, cuda:{local rank} on GPUs, the CPU
            # (gloo) without them.
            device = str(accelerator.device)
            self.accelerator = accelerator
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        return device

    # ------------------------------------------------------------------ lmms-eval plumbing

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = _flatten_visuals(doc_to_visual(self._doc(task, split, doc_id)))
        for visual in visuals:
            if not hasattr(visual, "convert"):
                raise ValueError(
                    f"llada_v supports images only; task {task} gave a {type(visual).__name__} ({str(visual)[:80]!r})"
                )
        return visuals  # decoded by the processor's own loader, as every other entry point

    def _prompt(self, context: str, num_images: int) -> str:
        image_token = self.processor.image_token
        if num_images and image_token in context:
            # The task placed its images itself: keep its text as the user message.
            messages = [{"role": "user", "content": context}]
        else:
            messages = [user_message(context, num_images)]
        return chat_prompt(self.processor, messages, self.system_prompt)

    def _generation_config(self, overrides: dict[str, Any], stops: list[str]) -> Any:
        usable = []
        for stop in stops:
            ids = self.tokenizer.encode(stop, add_special_tokens=False)
            # A stop the tokenizer cannot express as tokens is still applied to the decoded text.
            if ids and self.tokenizer.unk_token_id not in ids:
                usable.append(stop)
        if self.cfg_scale is not None:
            overrides = {"cfg_scale": self.cfg_scale, **overrides}
        if self.dllm_cache is not None:
            overrides = {"dllm_cache": self.dllm_cache, **overrides}
        config = generation_config_for(
            self.model.generation_config, {**overrides, "stop_strings": usable or None}, fast=self.fast
        )
        return config

    # ------------------------------------------------------------------ generate_until

    def generate_until(self, requests: list[Instance]) -> list[Any]:
        args = [request.args for request in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, (context, gen_kwargs, _, _, task, split) in enumerate(args):
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups[key].append(index)

        results: list[Any] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="llada_v generate_until", unit="request", disable=self.progress_disable)
        for (task, _, _), indices in groups.items():
            gen_kwargs = copy.deepcopy(args[indices[0]][1])
            overrides, sampler_stops, stops = resolve_generation(task, gen_kwargs, self.task_presets)
            try:
                config = self._generation_config(overrides, sampler_stops)
            except InputError as err:
                raise ValueError(f"llada_v: task {task}: {err}") from None
            # Longest prompts first: similar lengths share a batch (less padding).
            indices = sorted(indices, key=lambda i: -len(args[i][0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts, images = [], []
                for i in batch:
                    context, _, doc_to_visual, doc_id, task_name, split = args[i]
                    visuals = self._visuals(doc_to_visual, task_name, split, doc_id)
                    texts.append(self._prompt(context, len(visuals)))
                    images.append(visuals)
                answers, output = generate_texts(self.model, self.processor, texts, images, config, seed=self.seed)
                for row, i in enumerate(batch):
                    text = truncate_at_stops(answers[row], stops)
                    counts = TokenCounts(output_tokens=int(output.answer_lengths[row]))
                    results[i] = GenerationResult(text=text, token_counts=counts)
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), text)
                bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("llada_v does not implement multi-round generation")

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests: list[Instance]) -> list[LoglikelihoodResult]:
        """Per request `(loss, is_greedy)` (as `LoglikelihoodResult`, which unpacks like the tuple): the loss is
        minus the estimated log-likelihood per continuation token, which lmms-eval ranks with `argmin`."""
        results = []
        for request in tqdm(requests, desc="llada_v loglikelihood", unit="request", disable=self.progress_disable):
            args = request.args
            if len(args) == 2:  # unconditional requests (acc_mutual_info): text only
                context, continuation = args
                visuals, doc, key = [], None, (context,)
            else:
                context, continuation, doc_to_visual, doc_id, task, split = args
                doc = self._doc(task, split, doc_id)
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                key = (context, task, split, doc_id)
            if callable(continuation):
                continuation = continuation(doc)
            if isinstance(continuation, (list, tuple)):
                continuation = continuation[0]
            score = self.score(context, str(continuation), visuals, cache_key=key)
            result = (score.loss, score.is_greedy)
            results.append(LoglikelihoodResult(*result))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    @torch.no_grad()
    def score(self, context: str, continuation: str, images: list, cache_key: tuple | None = None) -> ContinuationScore:
        """The log-likelihood estimate of `continuation` as the answer to `context` about `images`, whether it is
        the sampler's greedy answer, and its token count.

        The continuation is the assistant's answer: it is stripped (the chat template trims message content) and
        tokenised on its own, right after the assistant header; nothing follows it. `cache_key` names the prompt
        (context + document): consecutive calls with the same key reuse the encoded prompt and images (the
        options of a multiple-choice question).
        """
        target = self.tokenizer.encode(continuation.strip(), add_special_tokens=False)
        if not target:
            return ContinuationScore(0.0, True, 0)
        prompt_text = self._prompt(context, len(images))
        if cache_key is not None and self._prompt_cache is not None and self._prompt_cache[0] == cache_key:
            inputs, prompt_embeds = self._prompt_cache[1]
        else:
            inputs = prepare_inputs(self.processor, [prompt_text], [images], self.device)
            prompt_embeds = self.model.embed_multimodal(
                inputs["input_ids"],
                inputs.get("pixel_values"),
                inputs.get("image_sizes"),
                inputs.get("image_layouts"),
                inputs.get("image_num_crops"),
            )  # (1, P, D)
            self._prompt_cache = (cache_key, (inputs, prompt_embeds))
        target_ids = torch.tensor(target, device=self.device)
        log_likelihood = self._mc_log_likelihood(inputs["input_ids"], prompt_embeds, target_ids)
        greedy = self._is_greedy(inputs, target) if self.check_greedy else False
        return ContinuationScore(log_likelihood, greedy, len(target))

    def _mc_log_likelihood(self, prompt_ids: torch.Tensor, prompt_embeds: torch.Tensor, target: torch.Tensor) -> float:
        """Minus the average over `mc_num` samples of the 1/t-weighted masked cross-entropy of `target`."""
        length = target.shape[0]
        prompt_len = prompt_embeds.shape[1]
        mask_id = self.model.config.mask_token_id
        cfg = float(self.cfg_scale or 0.0)
        generator = torch.Generator().manual_seed(self.seed)  # CPU: identical draws on every device
        # Stratified t in (0, 1]: t_j = (u + j) / n; k_j = ceil(t_j * L) masked tokens (uniform on 1..L).
        u = 1.0 - torch.rand((), generator=generator, dtype=torch.float64)
        t = (u + torch.arange(self.mc_num, dtype=torch.float64)) / self.mc_num
        num_masked = torch.ceil(t * length).clamp(1, length).long()  # (n,)
        samples = self.mc_num
        if length == 1:  # every sample masks the one token with weight 1: one forward gives the exact average
            num_masked, samples = num_masked[:1], 1
        positions = torch.arange(prompt_len, prompt_len + length, device=self.device)
        total = 0.0
        for start in range(0, samples, self.mc_batch_size):
            k = num_masked[start : start + self.mc_batch_size]  # (b,)
            b = k.shape[0]
            order = torch.rand((b, length), generator=generator).argsort(-1)  # random positions per sample
            masked = (order < k[:, None]).to(self.device)  # (b, L) exactly k[i] True per row
            noisy = torch.where(masked, torch.full_like(masked, mask_id, dtype=torch.long), target.expand(b, -1))
            canvas = torch.cat((prompt_ids.expand(b, -1), noisy), dim=1)  # (b, P + L)
            logits = self.model.diffusion_logits(
                canvas, prompt_embeds.expand(b, -1, -1), positions, cfg_scale=cfg, mask_token_id=mask_id
            )  # (b, L, V), guided with cfg
            ce = F.cross_entropy(logits[masked], target.expand(b, -1)[masked], reduction="none")  # (sum k,)
            weights = (length / k.to(self.device, torch.float32)).repeat_interleave(k.to(self.device))  # 1/t
            total += float((ce * weights).sum())
        return -total / samples

    def _is_greedy(self, inputs: dict, target: list[int]) -> bool:
        """Does the sampler, one token per step at temperature 0, answer exactly `target`?"""
        length = len(target)
        config = generation_config_for(
            self.model.generation_config,
            {
                "max_new_tokens": length,
                "steps": length,
                "block_length": length,
                "temperature": 0.0,
                "remasking": "low_confidence",
                "stop_token_ids": [],
                "stop_strings": None,
                "cfg_scale": float(self.cfg_scale or 0.0),
            },
        )
        config.return_dict_in_generate = True
        output = self.model.diffusion_generate(**inputs, generation_config=config)
        return output.answer_ids()[0] == list(target)


def manifest() -> Any:
    """The `lmms_eval.models` entry point: registers the model name `llada_v`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="llada_v", simple_class_path="llada_v.evaluation.lmms_eval_plugin.LladaV")


__all__ = [
    "ContinuationScore",
    "LladaV",
    "LoglikelihoodResult",
    "DiffusionPreset",
    "TASK_PRESETS",
    "manifest",
    "resolve_generation",
    "task_preset",
    "truncate_at_stops",
]
