"""Convert a released LLaDA-V checkpoint (GSAI-ML/LLaDA-V format) into this repository's format.

What it does, in order:
1. reads the official `config.json` (+ a SigLIP vision config: `--vision-config`, else so400m's),
   refusing settings this implementation does not reproduce;
2. streams every official tensor through ONE explicit key table (`KEY_TABLE`): a key maps to exactly one
   new name or is dropped on purpose with a stated reason; an unknown key or a missing expected key
   is an error;
3. writes sharded safetensors, `config.json` with `auto_map`, the remote-code files and the released
   generation defaults into a temporary folder next to the output;
4. verifies: reloads the temporary folder with `AutoModel.from_pretrained(..., trust_remote_code=True)`,
   checks every loaded parameter equals its source tensor, and runs a small forward;
5. only then renames the folder into place. Nothing is left half-written on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .configuration_llada_v import SIGLIP_SO400M_VISION_DEFAULTS, LladaVConfig
from .generation_utils import LladaVGenerationConfig
from .modeling_llada_v import LladaVModel

logger = logging.getLogger(__name__)

_VISION = r"model\.vision_tower\.vision_tower\.vision_model\."

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


# LLaDA config fields that carry over into `LladaVTextConfig` unchanged.
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
    """The input checkpoint does not match the released format."""


def map_key(key: str) -> tuple[str | None, str]:
    """Our name for an official key (None: dropped on purpose) and the reason; unknown keys raise."""
    for pattern, template, reason in KEY_TABLE:
        match = re.fullmatch(pattern, key)
        if match:
            return (match.expand(template) if template is not None else None), reason
    raise ConversionError(f"unknown key in the official checkpoint: {key!r} (not in the conversion table)")


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


def official_shards(input_dir: Path) -> list[Path]:
    index = input_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (input_dir / n).is_file()]
        if missing:
            raise ConversionError(f"shards listed in {index.name} are missing: {missing}")
        return [input_dir / n for n in names]
    single = input_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"no model.safetensors or model.safetensors.index.json in {input_dir}")


def iter_official_tensors(shards: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    for shard in tqdm(shards, desc="shards", unit="shard", disable=not progress):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def expected_keys(config: LladaVConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and shape of our model for `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = LladaVModel(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(B|KB|MB|GB)?", text.strip().upper())
    if not match:
        raise ValueError(f"invalid shard size {text!r}; use e.g. '5GB', '500MB'")
    unit = {"B": 1, None: 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[match.group(2)]
    return int(int(match.group(1)) * unit)


def write_weights(
    shards: list[Path], out_dir: Path, expected: dict, dtype: torch.dtype, max_shard_bytes: int, progress: bool
) -> dict[str, str]:
    """Stream, rename, cast and write shards; returns the weight map. Checks names, shapes and completeness."""
    weight_map: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    buffer: dict[str, torch.Tensor] = {}
    buffer_bytes = 0
    shard_files: list[str] = []

    def flush():
        nonlocal buffer, buffer_bytes
        if not buffer:
            return
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(buffer, str(out_dir / name), metadata={"format": "pt"})
        shard_files.append(name)
        for key in buffer:
            weight_map[key] = name
        buffer, buffer_bytes = {}, 0

    for key, tensor in iter_official_tensors(shards, progress):
        new_key, reason = map_key(key)
        if new_key is None:
            dropped.append((key, reason))
            continue
        if new_key not in expected:
            raise ConversionError(f"official key {key!r} maps to {new_key!r}, which the model does not have")
        if new_key in weight_map or new_key in buffer:
            raise ConversionError(f"two official keys map to {new_key!r}")
        if tuple(tensor.shape) != expected[new_key]:
            raise ConversionError(
                f"{key!r}: shape {tuple(tensor.shape)} does not match the model's {new_key} {expected[new_key]}"
            )
        tensor = tensor.to(dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if buffer and buffer_bytes + size > max_shard_bytes:
            flush()
        buffer[new_key] = tensor
        buffer_bytes += size
    flush()

    missing = sorted(set(expected) - set(weight_map) - _recomputed_buffers(expected))
    if missing:
        raise ConversionError(f"the official checkpoint lacks {len(missing)} expected tensors: {missing[:10]}")
    # Rename to the "-of-N" form transformers writes, and the index.
    total = len(shard_files)
    renamed = {}
    for i, name in enumerate(shard_files, 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(out_dir / name, out_dir / final)
        renamed[name] = final
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    total_size = sum((out_dir / f).stat().st_size for f in renamed.values())
    index = {"metadata": {"total_size": total_size, "dropped_keys": dict(dropped)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return weight_map


def _recomputed_buffers(expected: dict) -> set[str]:
    # Buffers in the state dict that are rebuilt at load and never stored.
    return {k for k in expected if k.endswith("rotary_emb.inv_freq") or k.endswith("position_ids")}


def find_tokenizer_dir(input_dir: Path, tokenizer_dir: Path | None) -> Path | None:
    """The released tokenizer folder: `--tokenizer-dir`, else the input folder when it holds one."""
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
            raise ConversionError(f"--tokenizer-dir {tokenizer_dir} has no tokenizer_config.json")
        return Path(tokenizer_dir)
    if (input_dir / "tokenizer_config.json").is_file():
        return input_dir
    return None


def write_processor(config: LladaVConfig, tokenizer_dir: Path, out_dir: Path) -> None:
    """The released tokenizer plus `<image>` (id `config.image_token_id`), the chat template and the image
    processor for `config`, saved with their remote code for `AutoProcessor`."""
    from .tokenizer_utils import build_processor

    build_processor(tokenizer_dir, config=config).save_pretrained(out_dir)


def write_code_and_configs(config: LladaVConfig, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json with auto_map, generation_config.json and the remote-code modules (real files)."""
    config.dtype = dtype
    config.architectures = ["LladaVModel"]
    config.auto_map = {
        "AutoConfig": "configuration_llada_v.LladaVConfig",
        "AutoModel": "modeling_llada_v.LladaVModel",
    }
    config.save_pretrained(out_dir)
    LladaVGenerationConfig.from_model_config(config).save_pretrained(out_dir)
    for name in remote_code_files():
        shutil.copyfile(Path(__file__).with_name(name), out_dir / name)


def remote_code_files() -> list[str]:
    """The modeling module and everything it reaches through `from .x import` (what transformers loads)."""
    here = Path(__file__).parent
    todo, seen = ["modeling_llada_v.py"], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        text = (here / name).read_text()
        todo.extend(f"{m}.py" for m in re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE))
    return sorted(seen)


_VERIFY_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModel

folder, dtype_name = sys.argv[1], sys.argv[2]
dtype = getattr(torch, dtype_name)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
if not type(model).__module__.startswith("transformers_modules."):
    sys.exit(f"the model class came from {type(model).__module__}, not the folder's remote code")
index = json.load(open(f"{folder}/model.safetensors.index.json"))
state = model.state_dict()
for shard in sorted(set(index["weight_map"].values())):
    for key, tensor in load_file(f"{folder}/{shard}").items():
        if not torch.equal(state[key], tensor):
            sys.exit(f"loaded {key} differs from the written tensor")
cfg = model.config
ids = torch.tensor([[cfg.bos_token_id, cfg.eot_token_id, cfg.mask_token_id, cfg.mask_token_id]])
side = cfg.vision_config.image_size
with torch.no_grad():
    logits = model(input_ids=ids).logits
    feats = model.get_image_features(torch.zeros(1, 3, side, side), image_layouts=torch.tensor([1]))
if tuple(logits.shape) != (1, 4, cfg.text_config.vocab_size) or not bool(torch.isfinite(logits).all()):
    sys.exit(f"forward gave logits of shape {tuple(logits.shape)} or non-finite values")
patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
if tuple(feats[0].shape) != (patches + 1, cfg.text_config.hidden_size):
    sys.exit(f"image features have shape {tuple(feats[0].shape)}")
import os
if os.path.isfile(f"{folder}/processor_config.json"):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    if not type(processor).__module__.startswith("transformers_modules."):
        sys.exit(f"the processor class came from {type(processor).__module__}")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    if image_id != cfg.image_token_id:
        sys.exit(f"the processor's <image> id {image_id} differs from config.image_token_id {cfg.image_token_id}")
print("verified")
"""


def verify(out_dir: Path, shards: list[Path], dtype: torch.dtype) -> None:
    """Check the written folder: every written tensor equals its (cast) source tensor; then, in a fresh
    process that never imports `llada_v`, load it with `AutoModel.from_pretrained(trust_remote_code=True)`,
    check the loaded parameters equal the written ones, and run a text and an image forward."""
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    written = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out_dir / shard), framework="pt") as f:
            written.update({k: (shard, None) for k in f.keys()})
    for key, tensor in iter_official_tensors(shards, progress=False):
        new_key, _ = map_key(key)
        if new_key is None:
            continue
        with safe_open(str(out_dir / written[new_key][0]), framework="pt") as f:
            if not torch.equal(f.get_tensor(new_key), tensor.to(dtype)):
                raise ConversionError(f"written {new_key} differs from the source tensor {key}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as modules_cache:
        env["HF_MODULES_CACHE"] = modules_cache
        result = subprocess.run(
            [sys.executable, "-c", _VERIFY_SCRIPT, str(out_dir), str(dtype).removeprefix("torch.")],
            cwd=modules_cache,
            env=env,
            capture_output=True,
            text=True,
        )
    if result.returncode != 0 or "verified" not in result.stdout:
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConversionError(f"verification of the converted folder failed: {detail}")


def convert(
    input_dir: Path,
    output_dir: Path,
    vision_config_path: Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    progress: bool = True,
    overwrite: bool = False,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Convert `input_dir` into `output_dir` (created atomically). Returns the output path.

    The processor (tokenizer + `<image>`, chat template, image processor) is written when a released
    tokenizer is found (`tokenizer_dir`, else `input_dir`); otherwise only the model files are written and a
    warning says so.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"input directory {input_dir} does not exist")
    if output_dir.exists() and not overwrite:
        raise ConversionError(f"output directory {output_dir} already exists (pass --overwrite to replace it)")
    config_file = input_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file} is missing")
    official = json.loads(config_file.read_text())
    vision = None
    if vision_config_path is not None:
        vision = json.loads(Path(vision_config_path).read_text())
    config = convert_config(official, vision)
    shards = official_shards(input_dir)
    expected = expected_keys(config)
    tokenizer_dir = find_tokenizer_dir(input_dir, tokenizer_dir)
    if tokenizer_dir is None:
        logger.warning(
            "no tokenizer in %s and no --tokenizer-dir: writing the model only (no processor files)", input_dir
        )

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        write_weights(shards, tmp, expected, dtype, _parse_size(max_shard_size), progress)
        write_code_and_configs(config, tmp, dtype)
        if tokenizer_dir is not None:
            write_processor(config, tokenizer_dir, tmp)
        verify(tmp, shards, dtype)
        _publishable_permissions(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _publishable_permissions(folder: Path) -> None:
    # mkdtemp makes a private (0700) folder; the result should have ordinary umask-based permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


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


_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        description="Convert a released LLaDA-V checkpoint (GSAI-ML/LLaDA-V format) to the llada-v format."
    )
    parser.add_argument("--input-dir", required=True, type=Path, help="folder with the official config.json + safetensors")
    parser.add_argument("--output-dir", required=True, type=Path, help="folder to create (must not exist)")
    parser.add_argument(
        "--vision-config", type=Path, default=None, help="SigLIP vision config JSON (default: so400m-patch14-384)"
    )
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=None,
        help="released LLaDA tokenizer folder (default: the input folder if it has one); the processor is "
        "written only when a tokenizer is found",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="dtype of the written weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 200MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--push-to-hub", metavar="REPO", default=None, help="after converting, upload the folder to this Hub repo"
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
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
            _DTYPES[args.dtype],
            args.max_shard_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            tokenizer_dir=args.tokenizer_dir,
        )
    except (ConversionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted checkpoint written to {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except Exception as err:  # noqa: BLE001 - report any upload failure as one line; the folder stays
            print(f"error: upload to {args.push_to_hub} failed ({type(err).__name__}: {err}); "
                  f"the converted folder is kept at {out}", file=sys.stderr)
            return 2
        print(f"uploaded to {args.push_to_hub}: {url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(build_arg_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
