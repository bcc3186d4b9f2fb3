"""Compose an untrained LLaDA-V (the Stage 1 starting point) from LLaDA-8B-Instruct and a SigLIP checkpoint.

What it does, in order:
1. reads LLaDA's `config.json` (language tower) and SigLIP's `config.json` (`SiglipModel` or
   `SiglipVisionModel`), and builds a `LladaVConfig`: the vision tower keeps all but the last encoder
   layer and no pooling head, as LLaDA-V does (docs/parity.md Q8); images use anyres_max_4 with the released
   pinpoints for the SigLIP crop size;
2. streams every source tensor through ONE explicit key table (`COMPOSE_KEY_TABLE`): a key maps to exactly
   one of our names or is dropped on purpose with a stated reason; an unknown key, a shape mismatch or a
   missing expected tensor is an error. The language rows are those of `official.KEY_TABLE`:
   LLaDA-8B-Instruct names its tensors like the language half of the released LLaDA-V checkpoint;
3. initialises what neither checkpoint has (`FRESH_KEYS`) from a seeded generator, as the official code
   does: the projector's two Linear layers with PyTorch's default Linear init, `image_newline` with
   `randn(hidden) / sqrt(hidden)`;
4. writes sharded safetensors, `config.json`, the generation defaults and the remote code into a temporary
   folder next to the output (the writers of `common`, shared with the converter), plus the processor when
   the LLaDA folder has its tokenizer (`<image>` added at id 126349);
5. verifies every written tensor against its source (or fresh) tensor, then loads the folder in a fresh
   process with `AutoModel.from_pretrained(..., trust_remote_code=True)` and runs a text and an image forward;
   only then renames the folder into place.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..arguments import add_output_arguments
from ..checkpoint_io import (
    DTYPES,
    atomic_folder,
    check_new_folder,
    check_output_outside_inputs,
    parse_size,
)
from ..configuration_llada_v import LladaVConfig
from .common import (
    TEXT_CONFIG_KEYS,
    ConversionError,
    MappedTensor,
    check_written,
    expected_keys,
    find_tokenizer_dir,
    finish_folder,
    iter_tensors,
    read_json,
    safetensors_shards,
    write_mapped_weights,
    write_model_configs,
    write_processor,
)
from .official import KEY_TABLE

logger = logging.getLogger(__name__)


def _is_language_row(row: tuple[str, str | None, str]) -> bool:
    pattern, template, _ = row
    if template is None:
        return "rotary_emb" in pattern
    return template.startswith(("language_model.", "lm_head."))


# LLaDA-8B-Instruct: the language rows of the official table (same `model.*` / `lm_head` names).
LLADA_ROWS = [row for row in KEY_TABLE if _is_language_row(row)]

_V = r"(?:vision_model\.)?"  # SiglipModel and transformers 4.x prefix; transformers 5 SiglipVisionModel has none
_LAYER_PARAMS = r"(?:layer_norm[12]|self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.(?:weight|bias)"
SIGLIP_ROWS: list[tuple[str, str | None, str]] = [
    (
        _V + r"embeddings\.(patch_embedding\.(?:weight|bias)|position_embedding\.weight)",
        r"vision_tower.embeddings.\1",
        "",
    ),
    (_V + rf"encoder\.layers\.(\d+)\.({_LAYER_PARAMS})", r"vision_tower.encoder.layers.\1.\2", ""),
    # Stored but unused by LLaDA-V (the feature is taken before it); kept, as in the released checkpoint.
    (_V + r"post_layernorm\.(weight|bias)", r"vision_tower.post_layernorm.\1", ""),
    (_V + r"head\..+", None, "attention-pooling head: LLaDA-V removes it"),
    (_V + r"embeddings\.position_ids", None, "SigLIP position_ids buffer: rebuilt at load"),
    (r"text_model\..+", None, "SigLIP text tower (SiglipModel checkpoint): not part of LLaDA-V"),
    (r"logit_(?:scale|bias)", None, "SiglipModel contrastive-loss scalars: not part of LLaDA-V"),
]
_DROPPED_LAYER_REASON = "the last SigLIP encoder layer: LLaDA-V deletes it (docs/parity.md Q8)"

# (source, source key regex, our key template or None to drop, reason when dropped). First match wins.
COMPOSE_KEY_TABLE: list[tuple[str, str, str | None, str]] = [
    *(("llada", pattern, template, reason) for pattern, template, reason in LLADA_ROWS),
    *(("siglip", pattern, template, reason) for pattern, template, reason in SIGLIP_ROWS),
]

# Tensors neither checkpoint has: our key -> how it is initialised.
FRESH_KEYS = {
    "multi_modal_projector.linear_1.weight": "PyTorch Linear default: kaiming_uniform(a=sqrt(5))",
    "multi_modal_projector.linear_1.bias": "PyTorch Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
    "multi_modal_projector.linear_2.weight": "PyTorch Linear default: kaiming_uniform(a=sqrt(5))",
    "multi_modal_projector.linear_2.bias": "PyTorch Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))",
    "image_newline": "randn(hidden) / sqrt(hidden), as the official LLaVA code",
}


def map_compose_key(source: str, key: str, stored_vision_layers: int) -> tuple[str | None, str]:
    """Our name for a source key (None: dropped on purpose) and the reason; unknown keys raise.

    Args:
        source: `"llada"` or `"siglip"`.
        key: the key in that checkpoint.
        stored_vision_layers: SigLIP encoder layers kept (the checkpoint's count minus one); deeper layers drop.
    """
    for row_source, pattern, template, reason in COMPOSE_KEY_TABLE:
        if row_source != source:
            continue
        match = re.fullmatch(pattern, key)
        if not match:
            continue
        if template is None:
            return None, reason
        new_key = match.expand(template)
        layer = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", new_key)
        if layer and int(layer.group(1)) == stored_vision_layers:
            return None, _DROPPED_LAYER_REASON
        return new_key, ""
    raise ConversionError(f"unknown key in the {source} checkpoint: {key!r} (not in the compose table)")


def _read_config(folder: Path, what: str) -> dict:
    return read_json(folder / "config.json", f"{what} config")


def siglip_vision_config(siglip: dict) -> dict:
    """The vision config LLaDA-V stores: the checkpoint's, one encoder layer fewer, no head."""
    model_type = siglip.get("model_type")
    if model_type == "siglip":
        vision = dict(siglip.get("vision_config") or {})
    elif model_type == "siglip_vision_model":
        vision = dict(siglip)
    else:
        raise ConversionError(
            f"SigLIP config model_type is {model_type!r}; expected 'siglip' (SiglipModel) or 'siglip_vision_model'"
        )
    vision = {
        k: v
        for k, v in vision.items()
        if k not in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path")
    }
    from transformers import SiglipVisionConfig

    full = SiglipVisionConfig(**vision)  # fills the defaults a checkpoint may omit
    if full.num_hidden_layers < 2:
        raise ConversionError(
            f"the SigLIP tower has {full.num_hidden_layers} layers; LLaDA-V drops the last, keeping >= 1"
        )
    if full.image_size % full.patch_size:
        raise ConversionError(f"SigLIP image_size {full.image_size} is not a multiple of patch_size {full.patch_size}")
    out = {
        k: getattr(full, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
            "attention_dropout",
        )
    }
    out["num_hidden_layers"] = full.num_hidden_layers - 1
    out["vision_use_head"] = False
    return out


def compose_config(llada: dict, siglip: dict, **overrides) -> LladaVConfig:
    """`LladaVConfig` for LLaDA's language config + a SigLIP config (released image settings, default ids).

    Args:
        llada: LLaDA-8B-Instruct's `config.json`.
        siglip: the SigLIP `config.json`.
        overrides: other `LladaVConfig` fields (e.g. `max_num_tiles`, `image_token_id`).
    """
    if llada.get("rope_scaling") not in (None, {}):
        raise ConversionError(f"rope_scaling {llada['rope_scaling']!r} is not supported (LLaDA has none)")
    if llada.get("tie_word_embeddings"):
        raise ConversionError("tie_word_embeddings is true; LLaDA-V needs LLaDA's untied lm_head")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers") if k not in llada]
    if missing:
        raise ConversionError(f"the LLaDA config lacks {missing}; is this a LLaDA-8B config.json?")
    text = {k: llada[k] for k in TEXT_CONFIG_KEYS if k in llada}
    eos = llada.get("eos_token_id", 126081)
    # LLaDA's config says bos_token_id 128000, outside its vocabulary (a known defect): keep our default 126080.
    config = LladaVConfig(
        text_config=text, vision_config=siglip_vision_config(siglip), eos_token_id=eos, pad_token_id=eos, **overrides
    )
    if config.image_token_id >= text["vocab_size"]:
        raise ConversionError(
            f"image_token_id {config.image_token_id} does not fit LLaDA's vocab_size {text['vocab_size']}"
        )
    return config


def fresh_tensors(config: LladaVConfig, seed: int) -> dict[str, torch.Tensor]:
    """The projector and newline of an untrained LLaDA-V (float32), deterministic for `seed`."""
    generator = torch.Generator().manual_seed(seed)
    vision, hidden = config.vision_config.hidden_size, config.text_config.hidden_size
    out = {}
    for name, (fan_out, fan_in) in (("linear_1", (hidden, vision)), ("linear_2", (hidden, hidden))):
        weight = torch.empty(fan_out, fan_in)
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(fan_in)
        out[f"multi_modal_projector.{name}.weight"] = weight
        out[f"multi_modal_projector.{name}.bias"] = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
    out["image_newline"] = torch.randn(hidden, generator=generator) / math.sqrt(hidden)
    if set(out) != set(FRESH_KEYS):
        raise RuntimeError(f"fresh tensors {sorted(out)} differ from FRESH_KEYS {sorted(FRESH_KEYS)}")
    return out


def mapped_sources(
    llada_dir: Path, siglip_dir: Path, config: LladaVConfig, fresh: dict[str, torch.Tensor], progress: bool | None
) -> Iterator[MappedTensor]:
    """Every tensor of both checkpoints with its new name (`map_compose_key`), then the fresh tensors."""
    stored_layers = config.vision_config.num_hidden_layers
    for source, folder in (("llada", llada_dir), ("siglip", siglip_dir)):
        for key, tensor in iter_tensors(safetensors_shards(folder), progress):
            new_key, reason = map_compose_key(source, key, stored_layers)
            yield MappedTensor(f"{source}:{key}", new_key, reason, tensor)
    for key, tensor in fresh.items():
        yield MappedTensor(f"fresh:{key}", key, "", tensor)


def compose(
    llada_dir: str | os.PathLike,
    siglip_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    **config_overrides,
) -> Path:
    """Build an untrained LLaDA-V in `output_dir` (created atomically) and return its path.

    Args:
        llada_dir: LLaDA-8B-Instruct folder (`config.json`, `model.safetensors[.index.json]` + shards).
        siglip_dir: SigLIP folder (`config.json` of a SiglipModel or SiglipVisionModel, safetensors).
        output_dir: folder to create.
        dtype: dtype of the written weights.
        seed: seed of the fresh projector and newline.
        max_shard_size: largest shard, e.g. `"5GB"`.
        tokenizer_dir: released LLaDA tokenizer folder for the processor (default: `llada_dir` when it has one;
            without one no processor is written and a warning says so).
        progress: a progress bar over shards (None: only when stderr is a terminal).
        overwrite: replace an existing `output_dir`.
        config_overrides: other `LladaVConfig` fields.
    """
    llada_dir, siglip_dir, output_dir = Path(llada_dir), Path(siglip_dir), Path(output_dir)
    for folder, what in ((llada_dir, "LLaDA"), (siglip_dir, "SigLIP")):
        if not folder.is_dir():
            raise ConversionError(f"{what} directory {folder} does not exist")
    check_output_outside_inputs(output_dir, (llada_dir, siglip_dir, tokenizer_dir))
    check_new_folder(output_dir, overwrite)
    config = compose_config(_read_config(llada_dir, "LLaDA"), _read_config(siglip_dir, "SigLIP"), **config_overrides)
    fresh = fresh_tensors(config, seed)
    tokenizer_dir = find_tokenizer_dir(llada_dir, None if tokenizer_dir is None else Path(tokenizer_dir))
    if tokenizer_dir is None:
        logger.warning(
            "no tokenizer in %s and no tokenizer_dir: the composed folder has the image processor only", llada_dir
        )

    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        write_mapped_weights(
            mapped_sources(llada_dir, siglip_dir, config, fresh, progress), tmp, expected_keys(config), dtype,
            parse_size(max_shard_size), metadata={"fresh_keys": dict(FRESH_KEYS)},
        )  # fmt: skip
        write_model_configs(config, tmp, dtype)
        write_processor(config, tokenizer_dir, tmp)
        check_written(tmp, mapped_sources(llada_dir, siglip_dir, config, fresh, progress=False), dtype)
        finish_folder(tmp, dtype)
    return output_dir


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        description="Build an untrained LLaDA-V (Stage 1 start) from LLaDA-8B-Instruct and a SigLIP checkpoint."
    )
    parser.add_argument("--llada-dir", required=True, type=Path, help="LLaDA-8B-Instruct folder")
    parser.add_argument(
        "--siglip-dir", required=True, type=Path, help="SigLIP folder (SiglipModel or SiglipVisionModel)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh projector and image newline")
    add_output_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    try:
        out = compose(
            args.llada_dir,
            args.siglip_dir,
            args.output_dir,
            dtype=DTYPES[args.dtype],
            seed=args.seed,
            max_shard_size=args.max_shard_size,
            tokenizer_dir=args.tokenizer_dir,
            progress=args.progress,
            overwrite=args.overwrite,
        )
    except (ConversionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"untrained LLaDA-V written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_from_args(build_arg_parser().parse_args(argv))


__all__ = [
    "COMPOSE_KEY_TABLE",
    "FRESH_KEYS",
    "compose",
    "compose_config",
    "fresh_tensors",
    "main",
    "map_compose_key",
    "siglip_vision_config",
]


if __name__ == "__main__":
    sys.exit(main())
