"""Loading a checkpoint and answering prompts: the one path from a prompt to answer text, shared by
`llada-v generate/chat`, the demo and the lmms-eval plugin.

- `inspect_checkpoint` / `load_pretrained`: checks that turn the usual mistakes (a path that does not exist, an
  official or foreign checkpoint, missing weights or processor, bitsandbytes missing) into one `InputError`
  line each, then `LladaVModel`/`LladaVProcessor.from_pretrained` with dtype, device and bitsandbytes 4/8-bit
  options, and a PEFT LoRA adapter (`adapter=`, or `model` naming an adapter folder: `resolve_adapter`). This
  package's own classes are used (the checkpoint's remote-code copies are for users without
  the package), so every object in a process has one class.
- `load_from_args`: the above for a command line's model group and sampler settings (`generate`, `chat`, `web`).
- `checkpoint_generation_config` / `generation_config_for`: a checkpoint's sampler defaults (read before its
  weights, so bad settings fail fast) with per-call overrides, optionally on top of the fast-decoding preset,
  with `steps`/`block_length` following a changed `max_new_tokens` when they no longer fit (`fit_schedule`).
- `chat_prompt` / `generate_texts` (`generate_answers`): chat template -> processor -> `diffusion_generate` ->
  decoded answers, for a batch of prompts with their images (left padding), each cut before its first stop
  string (`cut_at_stop_strings`, the rule OpenAI clients expect; docs/generation.md#stop-strings).

Package-only code (never part of a checkpoint's remote code).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from . import register_auto_classes
from .checkpoint_io import DTYPES
from .configuration_llada_v import LladaVConfig
from .generation_utils import (
    FAST_DECODING_PRESET,
    LladaVGenerationConfig,
    fit_schedule,
    resolve_generation_config,
    schedule_for_length,
)

register_auto_classes()  # the package's classes behind AutoConfig/AutoModel/AutoProcessor in every process that loads

MODEL_TYPE = LladaVConfig.model_type
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class InputError(ValueError):
    """Bad user input (path, checkpoint, flag combination, setting): reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------- loading


def resolve_device(device: str | None) -> torch.device:
    """`"auto"`/None -> `cuda` when available, else `cpu`; anything else must be a valid, available device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"unknown device {device!r} ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available on this machine")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`"auto"`/None -> bfloat16 on CUDA, float32 elsewhere; else one of `DTYPES`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(['auto', *DTYPES])}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with a separator, or starting like a path, is a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _read_json(path: Path) -> dict:
    """A checkpoint folder's JSON file; `InputError` naming it when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {_first_line(err)}") from None


def check_checkpoint(name: str) -> dict | None:
    """Validate a local checkpoint folder and return its `config.json` (None for a Hub id, checked on load)."""
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise InputError(f"no such checkpoint folder: {name}")
        return None
    if not path.is_dir():
        raise InputError(f"{name} is a file; --model takes a checkpoint folder (with config.json) or a Hub id")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{name} has no config.json: not a transformers checkpoint folder")
    config = _read_json(config_file)
    check_model_type(name, config)
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        raise InputError(f"{name} has no weights (model.safetensors or an index of shards)")
    return config


def check_model_type(name: str, config: dict) -> None:
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        return
    architectures = config.get("architectures") or []
    if any("LLaDA" in a for a in architectures) or model_type == "llada":
        raise InputError(
            f"{name} is an official LLaDA-V checkpoint (model_type {model_type!r}, {', '.join(architectures)}); "
            f"convert it first: llada-v convert --input-dir {name} --output-dir OUT"
        )
    raise InputError(f"{name} is a {model_type!r} checkpoint, not {MODEL_TYPE!r}")


def bitsandbytes_config(quantization: str | None, compute_dtype: torch.dtype) -> Any:
    """A `BitsAndBytesConfig` for `"4bit"`/`"8bit"` (None: no quantisation). Needs bitsandbytes installed."""
    if quantization is None:
        return None
    if quantization not in ("4bit", "8bit"):
        raise InputError(f"unknown quantisation {quantization!r}; choose 4bit or 8bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"--load-in-{quantization} needs bitsandbytes: pip install 'llada-v[quant]'")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def inspect_checkpoint(name: str) -> dict:
    """The `config.json` of a llada-v checkpoint (folder or Hub id), checked as `check_checkpoint` does."""
    config = check_checkpoint(name)
    if config is None:  # a Hub id: read its config.json there
        from transformers import PreTrainedConfig

        try:
            config, _ = PreTrainedConfig.get_config_dict(name)
        except (OSError, ValueError) as err:
            raise InputError(
                f"cannot load {name!r}: not a local folder, and the Hub says: {_first_line(err)}"
            ) from None
        check_model_type(name, config)
    return config


def load_pretrained(
    model: str | os.PathLike,
    processor: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    quantization: str | None = None,
    attn_implementation: str | None = None,
    need_processor: bool = True,
    config: dict | None = None,
    adapter: str | os.PathLike | None = None,
) -> tuple[Any, Any]:
    """Load a llada-v checkpoint (folder or Hub id) and its processor in eval mode.

    Args:
        model: checkpoint folder or Hub id (an adapter folder: see `resolve_adapter`).
        processor: where the processor lives (default: `model`).
        dtype: `"auto"` (bfloat16 on CUDA, float32 on CPU), `"float32"`, `"bfloat16"`, `"float16"` or a dtype.
        device: `"auto"`, `"cpu"`, `"cuda"`, `"cuda:1"`, ...
        quantization: None, `"4bit"` or `"8bit"` (bitsandbytes; the vision tower, projector, image newline and
            lm_head stay unquantised, see docs/quantization.md).
        attn_implementation: `"eager"`, `"sdpa"`, `"flash_attention_2"`, ... (default: the transformers choice).
        need_processor: raise when no processor can be loaded (else return None for it).
        config: the checkpoint's `config.json` when the caller already has it from `inspect_checkpoint`.
        adapter: a PEFT LoRA adapter folder applied on top (`apply_adapter`: merged into the weights, or kept
            beside quantised ones).

    Raises:
        InputError: with a one-line reason for every input problem the checks can see.
    """
    from .modeling_llada_v import LladaVModel

    name, adapter = resolve_adapter(str(model), adapter)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    if config is None:
        inspect_checkpoint(name)
    quantization_config = bitsandbytes_config(quantization, resolved_dtype)

    processor_name = str(processor) if processor is not None else name
    if need_processor:
        _check_processor_folder(processor_name)  # before the weights load: fail fast

    # device_map puts the weights straight on the device (no CPU copy of an 8B model first).
    kwargs: dict[str, Any] = {"dtype": resolved_dtype, "device_map": {"": resolved_device}}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        loaded = LladaVModel.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise InputError(f"cannot load the model from {name}: {_first_line(err)}") from None
    loaded.eval()
    if adapter is not None:
        loaded = apply_adapter(loaded, adapter, merge=quantization_config is None)

    loaded_processor = None
    if processor is not None or need_processor:
        loaded_processor = _load_processor(processor_name, need_processor)
    return loaded, loaded_processor


def resolve_adapter(model: str, adapter: str | os.PathLike | None) -> tuple[str, str | None]:
    """`(base checkpoint, adapter folder or None)` for a `model` / `adapter` pair.

    `model` may itself be a PEFT adapter folder (`adapter_config.json`, no `config.json`: what a LoRA run writes);
    its base is then the `base_model_name_or_path` the adapter records, as `AutoModel.from_pretrained` on such a
    folder does. Each adapter folder is checked here, before any weights load.
    """
    path = Path(model).expanduser()
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        if adapter is not None:
            raise InputError(f"{model} is an adapter folder and --adapter {adapter} is another; pass the base "
                             "checkpoint as --model")  # fmt: skip
        base = _adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise InputError(f"adapter {model} does not name its base model (base_model_name_or_path in "
                             "adapter_config.json); pass the base as --model and this folder as --adapter")  # fmt: skip
        return str(base), str(path)
    if adapter is not None:
        _adapter_config(Path(adapter).expanduser())
        return model, str(adapter)
    return model, None


def _adapter_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise InputError(f"adapter {path} has no adapter_config.json: not a PEFT adapter folder")
    config = _read_json(config_file)
    if config.get("peft_type") != "LORA":
        raise InputError(f"adapter {path} is a {config.get('peft_type')!r} adapter; llada-v loads LoRA adapters")
    return config


def apply_adapter(model: Any, adapter: str | os.PathLike, merge: bool = True) -> Any:
    """`model` with the PEFT LoRA adapter of folder `adapter`: merged into the weights (a plain `LladaVModel`
    again), or, on quantised weights (which cannot absorb it), left active in the wrapped modules."""
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError("loading an adapter needs peft: pip install 'llada-v[train]'") from None
    path = Path(adapter).expanduser()
    base = _adapter_config(path).get("base_model_name_or_path")
    try:
        with warnings.catch_warnings():  # PEFT 0.21 asks a deprecated transformers property: not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise InputError(f"cannot apply adapter {adapter}: {_load_error_reason(err)}") from None
    _warn_if_other_base(path, base, model)
    wrapped.eval()
    return wrapped.merge_and_unload() if merge else wrapped.get_base_model()


def _load_error_reason(err: BaseException) -> str:
    """One line saying why weights did not load: torch's "Error(s) in loading state_dict for X:" is followed by the
    reasons (`size mismatch for ...`), the first of which is kept."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return f"{lines[1]}{more}"
    return lines[0]


def _same_model(a: str, b: str) -> bool:
    """Whether two names (folders or Hub ids) denote the same checkpoint, as far as the names tell."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def _warn_if_other_base(adapter: Path, base: str | None, model: Any) -> None:
    # An adapter of the same shapes loads onto any such model; its deltas only mean something on their own base.
    loaded = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if base and loaded and not _same_model(str(base), str(loaded)):
        warnings.warn(
            f"adapter {adapter} was trained on {base} but is applied to {loaded}: it loads because the shapes match, "
            "yet its answers are only meaningful on its own base",
            UserWarning,
            stacklevel=3,
        )


def _check_processor_folder(name: str) -> None:
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise InputError(f"no such processor folder: {name}")
        return  # a Hub id: checked when loading
    if not (path / "processor_config.json").is_file():
        raise InputError(
            f"{name} has no processor (processor_config.json + tokenizer); pass --processor PATH, or convert with "
            "--tokenizer-dir to write one"
        )


def _load_processor(name: str, required: bool) -> Any:
    from .processing_llada_v import LladaVProcessor

    path = Path(name).expanduser()
    if path.exists() and not (path / "processor_config.json").is_file() and not required:
        return None
    _check_processor_folder(name)
    try:
        return LladaVProcessor.from_pretrained(name)
    except (OSError, ValueError, TypeError) as err:
        if not required:
            return None
        raise InputError(f"cannot load the processor from {name}: {_first_line(err)}") from None


# ---------------------------------------------------------------------------------------------- settings


def checkpoint_generation_config(name: str, config: dict) -> LladaVGenerationConfig:
    """The sampler defaults a checkpoint loads with, read before its weights: its `generation_config.json`,
    else (none there, as `from_pretrained` does too) the released defaults with the special ids of `config`."""
    saved = Path(name).expanduser() / "generation_config.json"
    try:
        return LladaVGenerationConfig.from_pretrained(name)
    except OSError as err:
        if saved.is_file():  # there, but unreadable: never fall back silently
            raise InputError(f"{saved} cannot be loaded: {_first_line(err)}") from None
        return LladaVGenerationConfig.from_model_config(config)
    except ValueError as err:
        raise InputError(f"{saved}: invalid generation settings ({_first_line(err)})") from None


def generation_config_for(
    base: Any, overrides: dict[str, Any] | None = None, fast: bool = False
) -> LladaVGenerationConfig:
    """`base` (a model's `generation_config`, or `checkpoint_generation_config`) with `overrides` (None values
    ignored), validated; `base` itself is not modified.

    When `max_new_tokens` is overridden but `steps`/`block_length` are not, the base values are kept if they fit
    the new length and replaced by `fit_schedule` otherwise. `fast=True` starts from
    `LladaVGenerationConfig.fast` (the recommended fast-decoding preset).

    Raises:
        InputError: an invalid combination (the `LladaVGenerationConfig.validate` message).
    """
    overrides = schedule_for_length(base, {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        config, unknown = resolve_generation_config(base, {**(FAST_DECODING_PRESET if fast else {}), **overrides})
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from None
    if unknown:
        raise InputError(f"unknown generation settings {sorted(unknown)}")
    return config


def model_name_from_args(args: argparse.Namespace) -> str:
    """`--model`, or the embedded demo checkpoint."""
    if args.model is not None:
        return args.model
    from .demo.model import demo_model_dir

    path = demo_model_dir()
    if not (path / "config.json").is_file():
        raise InputError(f"no --model given and no embedded demo checkpoint at {path}; pass --model PATH_OR_ID")
    return str(path)


def generation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings given on a command line (None: the checkpoint's)."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "block_length": args.block_length,
        "temperature": args.temperature,
        "remasking": args.remasking,
        "cfg_scale": args.cfg_scale,
        "dllm_cache": getattr(args, "dllm_cache", None),
        "stop_strings": getattr(args, "stop", None),  # `generate --stop`
    }


def check_answer_fits(max_new_tokens: int | None, checkpoint: dict) -> None:
    """`--max-new-tokens` that leaves no room for a prompt in the model's positions, refused before loading."""
    limit = (checkpoint.get("text_config") or {}).get("max_position_embeddings")
    if max_new_tokens is not None and limit is not None and max_new_tokens >= limit:
        raise InputError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt: the model has "
            f"max_position_embeddings {limit} for prompt + answer"
        )


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Model, processor and generation settings named by a command line's model group and sampler settings
    (`arguments.add_model_arguments`, `add_generation_arguments`: `generate`, `chat`, `web`); every check runs
    before the weights are read."""
    name, adapter = resolve_adapter(model_name_from_args(args), args.adapter)  # --model may be an adapter folder
    checkpoint = inspect_checkpoint(name)  # path, model type, weights
    check_answer_fits(args.max_new_tokens, checkpoint)
    config = generation_config_for(
        checkpoint_generation_config(name, checkpoint), generation_overrides(args), fast=args.fast
    )
    quantization = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    model, processor = load_pretrained(
        name, args.processor, dtype=args.dtype, device=args.device, quantization=quantization,
        attn_implementation=args.attn_implementation, config=checkpoint, adapter=adapter,
    )  # fmt: skip
    return model, processor, config


# ---------------------------------------------------------------------------------------------- prompts


def read_image(path: str | os.PathLike) -> Any:
    """An image file or http(s) URL decoded by the processor's own loader (`image_processing_llada_v.load_image`:
    EXIF orientation, 16-bit and palette handling, the pixel limit, the URL time and size limits), so it gives
    exactly the pixels of `processor(images=[path])`; `InputError` naming the path otherwise."""
    from .image_processing_llada_v import load_image

    if isinstance(path, str) and path.startswith(("http://", "https://")):  # as the library's load_image
        try:
            return load_image(path)
        except (ValueError, TypeError, OSError) as err:
            raise InputError(f"cannot read image {path}: {_first_line(err)}") from None
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"no such image: {path}")
    if not path.is_file():
        raise InputError(f"not an image file: {path}")
    try:
        return load_image(path)
    except (ValueError, TypeError, OSError) as err:
        raise InputError(f"cannot read image {path}: {_first_line(err)}") from None


def user_message(text: str, num_images: int = 0) -> dict:
    """A user turn with `num_images` images placed before the text (the LLaDA-V order)."""
    return {
        "role": "user",
        "content": [*({"type": "image"} for _ in range(num_images)), {"type": "text", "text": text}],
    }


def chat_prompt(processor: Any, messages: list[dict], system_prompt: str | None = None) -> str:
    """The chat-template text ending with the assistant header. `system_prompt=None` keeps the default one."""
    kwargs = {} if system_prompt is None else {"system_prompt": system_prompt}
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


def prepare_inputs(
    processor: Any,
    texts: list[str],
    images: Sequence[Sequence[Any]],
    device: torch.device,
    videos: Sequence[Sequence[Any]] | None = None,
) -> dict:
    """Processor outputs for `texts` (left-padded) with `images[i]` (and `videos[i]`, videos for the `<video>`
    placeholders) for prompt i, as tensors on `device`."""
    if len(images) != len(texts):
        raise ValueError(f"got image lists for {len(images)} prompts but {len(texts)} prompts")
    if videos is not None and len(videos) != len(texts):
        raise ValueError(f"got video lists for {len(videos)} prompts but {len(texts)} prompts")
    has_images = any(len(row) for row in images)
    has_videos = videos is not None and any(len(row) for row in videos)
    inputs = processor(
        images=[list(row) for row in images] if has_images else None,
        videos=[list(row) for row in videos] if has_videos else None,
        text=texts,
        return_tensors="pt",
    )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------- stop strings


def cut_at_stop_strings(text: str, stop_strings: Sequence[str] | None) -> tuple[str, str | None]:
    """`text` ended before the first stop string, as OpenAI clients expect, and the stop string that ended it.

    "First" is where a left-to-right generation would have stopped: the occurrence that ends earliest (the
    earlier start on a tie). The stop string itself is not returned and trailing white space is removed, as from
    every answer. Returns `(text, None)` when no stop string occurs.

    `diffusion_generate` also searches `stop_strings`, but as token ids, and after `<|eot_id|>` is found it stops
    looking for them (docs/parity.md Q15); a stop string can also be written with other tokens than its own
    encoding ("triangle" inside "triangles"). This cut on the decoded text is what `generate_texts`, `llada-v
    generate --stop` and the server apply.
    """
    best: tuple[int, int, str] | None = None
    for stop in stop_strings or []:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
            best = (start + len(stop), start, stop)
    if best is None:
        return text, None
    return text[: best[1]].rstrip(), best[2]


def stop_string_prefix_length(text: str, stop_strings: Sequence[str] | None) -> int:
    """How many characters at the end of `text` could be the start of a stop string (a stream holds them back
    until the next text shows whether the stop string follows)."""
    longest = 0
    for stop in stop_strings or []:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-length:]):
                longest = length
                break
    return longest


@dataclass
class Answer:
    """One decoded answer: `text` (cut before its first stop string), `num_tokens` (the answer tokens up to the
    stop: through the tokens that spell the stop string when one cut the text), `stop_string` (None: not cut)."""

    text: str
    num_tokens: int
    stop_string: str | None = None


def decode_answer(tokenizer: Any, ids: Sequence[int], stop_strings: Sequence[str] | None = None) -> Answer:
    """The answer text of answer ids (special tokens removed, stripped), cut before its first stop string."""
    ids = [int(i) for i in ids]
    text, stop = cut_at_stop_strings(tokenizer.decode(ids, skip_special_tokens=True).strip(), stop_strings)
    if stop is None:
        return Answer(text, len(ids))
    low, high = 1, len(ids)  # the fewest ids whose text already holds the stop string
    while low < high:
        middle = (low + high) // 2
        prefix = tokenizer.decode(ids[:middle], skip_special_tokens=True).strip()
        if cut_at_stop_strings(prefix, stop_strings)[1] is None:
            low = middle + 1
        else:
            high = middle
    return Answer(text, low, stop)


def generate_answers(
    model: Any,
    processor: Any,
    texts: list[str],
    images: Sequence[Sequence[Any]],
    generation_config: LladaVGenerationConfig,
    step_callback: Callable[[Any], None] | None = None,
    seed: int | None = None,
    streamer: Any = None,
    videos: Sequence[Sequence[Any]] | None = None,
) -> tuple[list[Answer], Any]:
    """`generate_texts` with each answer's token count and the stop string that cut it (`Answer`)."""
    device = model.device
    inputs = prepare_inputs(processor, texts, images, device, videos)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    config = copy.deepcopy(generation_config)
    config.return_dict_in_generate = True
    stops = generation_config.stop_strings
    last_step = []
    callback = step_callback
    if stops:  # keep the last step: its canvas still holds the ids of a stop string the sampler stopped at

        def callback(step):
            last_step[:] = [step]
            if step_callback is not None:
                step_callback(step)

    generate = model.diffusion_generate if streamer is None else partial(model.generate, streamer=streamer)
    output = generate(
        **inputs,
        generation_config=config,
        step_callback=callback,
        generator=generator,
        tokenizer=processor.tokenizer,
    )
    answers = []
    for row, ids in enumerate(output.answer_ids()):
        if last_step:
            step = last_step[0]
            following = step.canvas[row, step.prompt_length + len(ids) :].tolist()
            answers.append(decode_answer_at_stop(processor.tokenizer, ids, following, stops))
        else:
            answers.append(decode_answer(processor.tokenizer, ids, stops))
    return answers, output


def decode_answer_at_stop(
    tokenizer: Any, ids: Sequence[int], following: Sequence[int], stop_strings: Sequence[str] | None
) -> Answer:
    """`decode_answer` of answer ids that end where the sampler stopped; `following`: the canvas ids after them.
    When those begin with a stop string's ids, they count too: the answer's tokens run through the stop string,
    as when only the text holds it (docs/serving.md, usage)."""
    following = [int(i) for i in following]
    for text in stop_strings or []:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if encoded and following[: len(encoded)] == encoded:
            return decode_answer(tokenizer, [*ids, *encoded], stop_strings)
    return decode_answer(tokenizer, ids, stop_strings)


def generate_texts(
    model: Any,
    processor: Any,
    texts: list[str],
    images: Sequence[Sequence[Any]],
    generation_config: LladaVGenerationConfig,
    step_callback: Callable[[Any], None] | None = None,
    seed: int | None = None,
    streamer: Any = None,
    videos: Sequence[Sequence[Any]] | None = None,
) -> tuple[list[str], Any]:
    """Answer a batch of chat-template prompts. Returns the decoded answers (up to the stop, special tokens
    removed, cut before the first of the config's `stop_strings`: `cut_at_stop_strings`) and the
    `LladaVGenerateOutput` (`answer_ids()`, `prompt_length`, counters). `videos[i]` holds the videos (lists of
    frames) of prompt i's `<video>` placeholders. With a `streamer` (a batch of one) the call goes through
    `model.generate`, which feeds it; the ids are the same."""
    answers, output = generate_answers(
        model, processor, texts, images, generation_config, step_callback, seed, streamer, videos
    )
    return [answer.text for answer in answers], output


__all__ = [
    "Answer",
    "InputError",
    "apply_adapter",
    "check_checkpoint",
    "checkpoint_generation_config",
    "cut_at_stop_strings",
    "decode_answer",
    "decode_answer_at_stop",
    "inspect_checkpoint",
    "fit_schedule",
    "generate_answers",
    "generate_texts",
    "generation_config_for",
    "load_from_args",
    "load_pretrained",
    "chat_prompt",
    "prepare_inputs",
    "read_image",
    "resolve_adapter",
    "resolve_device",
    "resolve_dtype",
    "user_message",
]
