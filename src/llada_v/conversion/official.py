"""Convert a released LLaDA-V checkpoint (GSAI-ML/LLaDA-V format) into this repository's format.

What it does, in order:
1. reads the official `config.json` (+ a SigLIP vision config: `--vision-config`, else so400m's),
   refusing settings this implementation does not reproduce;
2. streams every official tensor through ONE explicit key table (`KEY_TABLE`): a key maps to exactly one
   new name or is dropped on purpose with a stated reason; an unknown key or a missing expected key
   is an error;
3. writes sharded safetensors, `config.json`, the released generation defaults, the processor (when a
   tokenizer is found) and the remote code into a temporary folder next to the output;
4. verifies: every written tensor equals its source tensor; a fresh process loads the folder with
   `AutoModel.from_pretrained(..., trust_remote_code=True)`, compares the loaded parameters and runs a text
   and an image forward;
5. only then renames the folder into place (`checkpoint_io.atomic_folder`). Nothing is left half-written on
   failure.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ..arguments import CONVERT_DESCRIPTION, add_convert_arguments
from ..checkpoint_io import (
    DTYPES,
    atomic_folder,
    check_new_folder,
    check_output_outside_inputs,
    parse_size,
)
from ..configuration_llada_v import SIGLIP_SO400M_VISION_DEFAULTS, LladaVConfig
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
from .model_card import write_model_card

logger = logging.getLogger(__name__)

_VISION = r"model\.vision_tower\.vision_tower\.vision_model\."

RELEASED_REPO_ID = "GSAI-ML/LLaDA-V"  # the released checkpoint this converter reads: the card's base_model

# (official key regex, our key template or None to drop, reason when dropped). First match wins.
KEY_TABLE: list[tuple[str, str | None, str]] = [
    (r"model\.embed_tokens\.weight", "language_model.embed_tokens.weight", ""),
    (
        r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj\.weight|mlp\.(?:gate|up|down)_proj\.weight"
        r"|input_layernorm\.weight|post_attention_layernorm\.weight)",
        r"language_model.layers.\1.\2",
        "",
    ),
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", None, "RoPE buffer: recomputed from rope_theta"),
    (r"model\.norm\.weight", "language_model.norm.weight", ""),
    (r"lm_head\.weight", "lm_head.weight", ""),
    (r"model\.image_newline", "image_newline", ""),
    (r"model\.mm_projector\.0\.(weight|bias)", r"multi_modal_projector.linear_1.\1", ""),
    (r"model\.mm_projector\.2\.(weight|bias)", r"multi_modal_projector.linear_2.\1", ""),
    (
        _VISION + r"(embeddings\.(?:patch_embedding\.(?:weight|bias)|position_embedding\.weight))",
        r"vision_tower.\1",
        "",
    ),
    (
        _VISION + r"encoder\.layers\.(\d+)\.((?:layer_norm[12]|self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
        r"\.(?:weight|bias))",
        r"vision_tower.encoder.layers.\1.\2",
        "",
    ),
    # Stored but unused by LLaDA-V (the feature is taken before it); kept so the parameter count and
    # the weights stay those of the release.
    (_VISION + r"(post_layernorm\.(?:weight|bias))", r"vision_tower.\1", ""),
    (_VISION + r"embeddings\.position_ids", None, "SigLIP position_ids buffer: rebuilt at load"),
]

# Settings of the official config that this implementation reproduces; anything else is refused.
_REQUIRED_MM = {
    "mm_projector_type": "mlp2x_gelu",
    "mm_patch_merge_type": "spatial_unpad",
    "mm_newline_position": "grid",
    "mm_spatial_pool_mode": "bilinear",
}


def map_key(key: str) -> tuple[str | None, str]:
    """Our name for an official key (None: dropped on purpose) and the reason; unknown keys raise."""
    for pattern, template, reason in KEY_TABLE:
        match = re.fullmatch(pattern, key)
        if match:
            return (match.expand(template) if template is not None else None), reason
    raise ConversionError(f"unknown key in the official checkpoint: {key!r} (not in the conversion table)")


def check_official_model_type(official: dict, input_dir: Path) -> None:
    """The released LLaDA-V `config.json` is a LLaDA config with the LLaVA fields (`model_type` "llada",
    `LlavaLLaDAModelLM`); refuse anything else with what it is."""
    model_type, architectures = official.get("model_type"), official.get("architectures") or []
    if model_type == "llada_v":
        raise ConversionError(f"{input_dir} is already a llada-v checkpoint (model_type 'llada_v'): nothing to convert")
    if model_type != "llada" and not any("LLaDA" in str(a) for a in architectures):
        names = ", ".join(map(str, architectures)) or "no architectures"
        raise ConversionError(
            f"{input_dir}/config.json is a {model_type!r} checkpoint ({names}), not a released LLaDA-V one "
            "(model_type 'llada', LlavaLLaDAModelLM)"
        )


def convert_config(official: dict, vision: dict | None) -> LladaVConfig:
    """Build our `LladaVConfig` from the official `config.json` and a SigLIP vision config."""
    for key, expected in _REQUIRED_MM.items():
        if official.get(key) != expected:
            raise ConversionError(f"{key} is {official.get(key)!r}; only {expected!r} is supported")
    if official.get("rope_scaling") not in (None, {}):
        raise ConversionError(f"rope_scaling {official['rope_scaling']!r} is not supported (the release has none)")
    aspect = official.get("image_aspect_ratio", "")
    match = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if not match:
        raise ConversionError(f"image_aspect_ratio {aspect!r} is not supported; expected 'anyres_max_<N>'")
    if official.get("mm_vision_select_layer") != -2:
        raise ConversionError(
            f"mm_vision_select_layer {official.get('mm_vision_select_layer')!r} is not supported; the release "
            "uses -2 of the pretrained tower, i.e. the last layer of the stored one"
        )
    vision_cfg = dict(SIGLIP_SO400M_VISION_DEFAULTS)
    if vision is not None:
        vision_cfg.update({k: v for k, v in vision.items() if k not in ("model_type", "architectures")})
    vision_cfg["vision_use_head"] = False
    if official.get("mm_hidden_size") not in (None, vision_cfg["hidden_size"]):
        raise ConversionError(
            f"mm_hidden_size ({official['mm_hidden_size']}) differs from the vision hidden size "
            f"({vision_cfg['hidden_size']}); pass the matching --vision-config"
        )
    text_cfg = {k: official[k] for k in TEXT_CONFIG_KEYS if k in official}
    # Official pinpoints are [width, height]; ours are (height, width) in the same (tie-breaking) order.
    pinpoints = official.get("image_grid_pinpoints")
    if pinpoints is not None:
        if isinstance(pinpoints, str):
            raise ConversionError(f"image_grid_pinpoints must be an explicit list, got the string {pinpoints!r}")
        pinpoints = [[int(h), int(w)] for w, h in pinpoints]
    eos = official.get("eos_token_id", 126081)
    # The official bos_token_id (128000) lies outside the vocabulary (a known defect): keep our default.
    return LladaVConfig(
        text_config=text_cfg,
        vision_config=vision_cfg,
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        max_num_tiles=int(match.group(1)),
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=bool(official.get("tie_word_embeddings", False)),
    )


def mapped_official_tensors(shards: list[Path], progress: bool | None = None) -> Iterator[MappedTensor]:
    """Every tensor of the official shards with its new name (`map_key`)."""
    for key, tensor in iter_tensors(shards, progress):
        new_key, reason = map_key(key)
        yield MappedTensor(key, new_key, reason, tensor)


def convert(
    input_dir: Path,
    output_dir: Path,
    vision_config_path: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    progress: bool | None = None,
    overwrite: bool = False,
    tokenizer_dir: Path | None = None,
    command: str | None = None,
) -> Path:
    """Convert `input_dir` into `output_dir` (created atomically). Returns the output path.

    `progress`: a bar over the shards (None: only when stderr is a terminal). `command`: how the conversion was
    asked for, recorded in the folder's model card (`README.md`, `model_card.write_model_card`); default: this
    call with its folders.

    The processor (tokenizer + `<image>`, chat template, image processor) is written when a released
    tokenizer is found (`tokenizer_dir`, else `input_dir`); otherwise only the model files are written and a
    warning says so.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"input directory {input_dir} does not exist")
    check_output_outside_inputs(output_dir, (input_dir, vision_config_path, tokenizer_dir))
    check_new_folder(output_dir, overwrite)
    official = read_json(input_dir / "config.json", "the official config")
    check_official_model_type(official, input_dir)
    vision = None
    if vision_config_path is not None:
        vision = read_json(Path(vision_config_path), "the vision config")
    config = convert_config(official, vision)
    shards = safetensors_shards(input_dir)
    expected = expected_keys(config)
    tokenizer_dir = find_tokenizer_dir(input_dir, tokenizer_dir)
    if tokenizer_dir is None:
        logger.warning(
            "no tokenizer in %s and no --tokenizer-dir: writing the image processor only (add the tokenizer with "
            "--tokenizer-dir for the full processor)",
            input_dir,
        )

    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        write_mapped_weights(
            mapped_official_tensors(shards, progress), tmp, expected, dtype, parse_size(max_shard_size)
        )
        write_model_configs(config, tmp, dtype)
        write_processor(config, tokenizer_dir, tmp)
        write_model_card(tmp, RELEASED_REPO_ID, command or _python_call(input_dir, output_dir, tokenizer_dir, dtype))
        check_written(tmp, mapped_official_tensors(shards, progress=False), dtype)
        finish_folder(tmp, dtype)
    return output_dir


def _python_call(input_dir: Path, output_dir: Path, tokenizer_dir: Path | None, dtype: torch.dtype) -> str:
    tokenizer = f", tokenizer_dir={str(tokenizer_dir)!r}" if tokenizer_dir else ""
    return f"llada_v.conversion.official.convert({str(input_dir)!r}, {str(output_dir)!r}{tokenizer}, dtype={dtype})"


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload every file of a converted folder in one commit.

    Uses `huggingface_hub`'s standard endpoint settings (`HF_ENDPOINT`, `HF_TOKEN`); returns the commit URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} is not a converted checkpoint (no config.json)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    logger.info("uploading %d files (%.1f MB) to %s", len(files), sum(p.stat().st_size for p in files) / 1e6, repo_id)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message="Upload LLaDA-V converted with llada-v"
    )
    return str(info)


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        description=CONVERT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_convert_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    if args.private and not args.push_to_hub:
        print("error: --private only makes sense with --push-to-hub REPO", file=sys.stderr)
        return 2
    try:
        out = convert(
            args.input_dir,
            args.output_dir,
            args.vision_config,
            DTYPES[args.dtype],
            args.max_shard_size,
            progress=args.progress,
            overwrite=args.overwrite,
            tokenizer_dir=args.tokenizer_dir,
            command=shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        )
    except (ConversionError, ValueError, OSError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted checkpoint written to {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as err:  # noqa: BLE001 - report any upload failure as one line; the folder stays
            print(
                f"error: upload to {args.push_to_hub} failed ({type(err).__name__}: {err}); "
                f"the converted folder is kept at {out}",
                file=sys.stderr,
            )
            return 2
        print(f"uploaded to {args.push_to_hub}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
