"""What the official-checkpoint converter and compose share.

Both stream source tensors through a key table: each tensor maps to exactly one of our names or is dropped
on purpose with a reason (`MappedTensor`). `write_mapped_weights` checks names, shapes and completeness while
writing the shards; `check_written` re-reads every written tensor against its source; `write_model_configs`,
`write_processor` and `finish_folder` complete the folder (configs, processor, remote code, the fresh-process
load check). Their command-line options are in `llada_v.arguments`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..arguments import tqdm_disable
from ..checkpoint_io import (
    ShardWriter,
    verify_in_fresh_process,
    write_remote_code,
)
from ..configuration_llada_v import LladaVConfig
from ..generation_utils import LladaVGenerationConfig
from ..image_processing_llada_v import LladaVImageProcessor
from ..modeling_llada_v import LladaVModel

logger = logging.getLogger(__name__)

# LLaDA config fields that carry over into `LladaVTextConfig` unchanged (the released LLaDA-V config holds
# the same fields).
TEXT_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "attention_bias",
    "attention_dropout",
    "initializer_range",
)


class ConversionError(ValueError):
    """An input checkpoint does not match the format it should have."""


class MappedTensor(NamedTuple):
    """One source tensor and where it goes: `new_key` None means dropped on purpose, for `reason`."""

    source: str  # how errors and the index name it, e.g. "model.norm.weight" or "siglip:head.probe"
    new_key: str | None
    reason: str
    tensor: torch.Tensor


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; `ConversionError` naming the file when it is missing or malformed."""
    if not path.is_file():
        raise ConversionError(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{what} {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def safetensors_shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards of its index, or its single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"the weight index {index} has no weight_map")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConversionError(f"shards listed in {index.name} are missing: {missing}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def iter_tensors(shards: list[Path], progress: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the shards; `ConversionError` naming the shard when one is truncated or corrupt."""
    for shard in tqdm(shards, desc="shards", unit="shard", disable=tqdm_disable(progress)):
        try:
            with safe_open(str(shard), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"cannot read {shard} (truncated or corrupt safetensors file): {err}") from None


def expected_keys(config: LladaVConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of our model for `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LladaVModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def recomputed_buffers(expected: dict) -> set[str]:
    """Buffers in the state dict that are rebuilt at load and never stored."""
    return {k for k in expected if k.endswith("rotary_emb.inv_freq") or k.endswith("position_ids")}


def write_mapped_weights(
    stream: Iterable[MappedTensor],
    out_dir: Path,
    expected: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    max_shard_bytes: int,
    metadata: dict | None = None,
) -> dict[str, str]:
    """Cast and write the mapped tensors into shards; returns the weight map.

    Every kept tensor must be an expected key of the right shape, no key may come twice, and every expected
    tensor (except recomputed buffers) must be written. The index metadata records the dropped keys.
    """
    writer = ShardWriter(out_dir, max_shard_bytes)
    dropped: dict[str, str] = {}
    for item in stream:
        if item.new_key is None:
            dropped[item.source] = item.reason
            continue
        if item.new_key not in expected:
            raise ConversionError(f"{item.source!r} maps to {item.new_key!r}, which the model does not have")
        if tuple(item.tensor.shape) != expected[item.new_key]:
            raise ConversionError(
                f"{item.source!r}: shape {tuple(item.tensor.shape)} does not match the model's {item.new_key} "
                f"{expected[item.new_key]}"
            )
        if writer.holds(item.new_key):
            raise ConversionError(f"two source tensors map to {item.new_key!r}")
        writer.add(item.new_key, item.tensor.to(dtype).contiguous())
    weight_map = writer.finish({"dropped_keys": dropped, **(metadata or {})})
    missing = sorted(set(expected) - set(weight_map) - recomputed_buffers(expected))
    if missing:
        raise ConversionError(f"the input lacks {len(missing)} expected tensors: {missing[:10]}")
    return weight_map


def check_written(out_dir: Path, stream: Iterable[MappedTensor], dtype: torch.dtype) -> None:
    """Every written tensor equals its (cast) source tensor, and every written tensor has a source."""
    weight_map = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    checked = set()
    with ExitStack() as stack:
        handles = {
            name: stack.enter_context(safe_open(str(out_dir / name), framework="pt"))
            for name in set(weight_map.values())
        }
        for item in stream:
            if item.new_key is None:
                continue
            if not torch.equal(handles[weight_map[item.new_key]].get_tensor(item.new_key), item.tensor.to(dtype)):
                raise ConversionError(f"written {item.new_key} differs from its source {item.source}")
            checked.add(item.new_key)
    if checked != set(weight_map):
        raise ConversionError(f"written tensors without a source: {sorted(set(weight_map) - checked)[:10]}")


def write_model_configs(config: LladaVConfig, out_dir: Path, dtype: torch.dtype) -> None:
    """`config.json` and the released generation defaults for `config` (`generation_config.json`)."""
    config.dtype = dtype
    config.architectures = ["LladaVModel"]
    config.save_pretrained(out_dir)
    LladaVGenerationConfig.from_model_config(config).save_pretrained(out_dir)


def find_tokenizer_dir(input_dir: Path, tokenizer_dir: Path | None) -> Path | None:
    """The released tokenizer folder: `tokenizer_dir` when given, else `input_dir` when it holds one."""
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            raise ConversionError(f"--tokenizer-dir {tokenizer_dir} has no tokenizer_config.json")
        return Path(tokenizer_dir)
    if (input_dir / "tokenizer_config.json").is_file():
        return input_dir
    return None


def write_processor(config: LladaVConfig, tokenizer_dir: Path | None, out_dir: Path) -> None:
    """The processor for `config`: with a tokenizer folder, the full processor (the released tokenizer plus
    `<image>` at `config.image_token_id`, the chat template and the image processor); without one, the image
    processor alone (`preprocessor_config.json`: `AutoImageProcessor`/`AutoProcessor` load it, and the full
    processor can be added later with `--tokenizer-dir`)."""
    if tokenizer_dir is None:
        LladaVImageProcessor.from_model_config(config).save_pretrained(out_dir)
        return
    from .tokenizer import build_processor

    build_processor(tokenizer_dir, config=config).save_pretrained(out_dir)


def finish_folder(out_dir: Path, dtype: torch.dtype) -> None:
    """Add the remote code, then load the folder in a fresh process (`verify_in_fresh_process`)."""
    write_remote_code(out_dir)
    try:
        verify_in_fresh_process(out_dir, dtype)
    except RuntimeError as err:
        raise ConversionError(f"verification of the written folder failed: {err}") from None


__all__ = [
    "TEXT_CONFIG_KEYS",
    "ConversionError",
    "MappedTensor",
    "check_written",
    "expected_keys",
    "find_tokenizer_dir",
    "finish_folder",
    "iter_tensors",
    "read_json",
    "recomputed_buffers",
    "safetensors_shards",
    "write_mapped_weights",
    "write_model_configs",
    "write_processor",
]
