"""Writing checkpoint folders: what every writer of a llada-v folder shares.

- `REMOTE_CODE_FILES`: the one list of the flat modules that make a folder loadable with
  `trust_remote_code=True`; `write_remote_code(folder)` copies exactly them and writes the `auto_map`
  entries of every config file present (model, processor, image processor, tokenizer) and, in `config.json`,
  the transformers releases the code supports (`supported_transformers`). Conversion,
  compose, the trainer's saves and the demo all call it; nothing else puts code into a checkpoint.
- `DTYPES`: the dtype names accepted on command lines and in configs (`arguments.DTYPE_NAMES`) -> torch dtypes.
- `parse_size`: shard sizes such as `"5GB"`; `ShardWriter`: sharded safetensors plus their index.
- `atomic_folder`: build a folder under a temporary name next to its destination and rename it into place
  only when everything succeeded; temporary folders of killed writers are cleaned up by the next write;
  `check_output_outside_inputs` refuses an output that is, contains or lies inside an input.
- `verify_in_fresh_process`: load a written folder with `AutoModel.from_pretrained(trust_remote_code=True)`
  in a new Python process that cannot import `llada_v`, compare its weights and run a text and an image
  forward.

Package-only code (never part of a checkpoint's remote code).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from .arguments import DTYPE_NAMES
from .compat_llada_v import TRANSFORMERS_RANGE

# The remote-code modules: flat files beside this one, importing each other only as `from .x import y`.
REMOTE_CODE_FILES: tuple[str, ...] = (
    "cache_llada_v.py",
    "compat_llada_v.py",
    "configuration_llada_v.py",
    "denoising_llada_v.py",
    "dllm_cache_llada_v.py",
    "generation_config_llada_v.py",
    "generation_utils.py",
    "image_layout_llada_v.py",
    "image_processing_llada_v.py",
    "image_resize_llada_v.py",
    "modeling_llada_v.py",
    "processing_llada_v.py",
    "sampling_llada_v.py",
)
SOURCE_DIR = Path(__file__).resolve().parent
_OWNER_FILE = ".llada_v-writer"  # "<host> <pid>" of the process writing a temporary folder

logger = logging.getLogger(__name__)

# `auto_map` of each config file a llada-v folder can hold (file -> entries; "image_processor" is the entry
# nested in processor_config.json).
_MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_llada_v.LladaVConfig",
    "AutoModel": "modeling_llada_v.LladaVModel",
    # The class `pipeline("image-text-to-text", trust_remote_code=True)` loads (docs/generation.md#pipeline).
    "AutoModelForImageTextToText": "modeling_llada_v.LladaVModel",
}
_PROCESSOR = {"AutoProcessor": "processing_llada_v.LladaVProcessor"}
_IMAGE_PROCESSOR = {"AutoImageProcessor": "image_processing_llada_v.LladaVImageProcessor"}

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


def write_remote_code(folder: str | os.PathLike) -> list[str]:
    """Make `folder` a remote-code checkpoint: copy `REMOTE_CODE_FILES` there (real files) and write the
    `auto_map` of each config file it holds. Returns the names of the config files updated.

    Call it after `save_pretrained` of the model and/or processor; it is idempotent.
    """
    folder = Path(folder)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(SOURCE_DIR / name, folder / name)
    has_processor = (folder / "processor_config.json").is_file()
    updated = []
    for name, auto_map in (
        ("config.json", _MODEL_AUTO_MAP),
        ("processor_config.json", _PROCESSOR),
        ("preprocessor_config.json", _IMAGE_PROCESSOR),
        ("tokenizer_config.json", _PROCESSOR if has_processor else None),
    ):
        path = folder / name
        if auto_map is None or not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        data["auto_map"] = dict(auto_map)
        if name == "config.json":  # the transformers releases the copied code runs under (compat_llada_v)
            data["supported_transformers"] = TRANSFORMERS_RANGE
        if name == "processor_config.json" and isinstance(data.get("image_processor"), dict):
            data["image_processor"]["auto_map"] = {**_IMAGE_PROCESSOR, **_PROCESSOR}
        _write_json(path, data)
        updated.append(name)
    return updated


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def parse_size(text: str) -> int:
    """`"5GB"`, `"500MB"`, `"64KB"` or a byte count -> bytes (decimal units, as transformers); must be > 0."""
    match = re.fullmatch(r"(\d+)\s*(B|KB|MB|GB)?", str(text).strip().upper())
    if not match:
        raise ValueError(f"invalid shard size {text!r}; use e.g. '5GB', '500MB'")
    unit = {"B": 1, None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    size = int(match.group(1)) * unit
    if size <= 0:
        raise ValueError(f"the shard size must be positive, got {text!r}")
    return size


def check_output_outside_inputs(output_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the inputs (folders or files): writing
    it would replace or delete them, whatever the flags."""
    out = Path(output_dir).expanduser().resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).expanduser().resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ValueError(
                f"the output folder {output_dir} overlaps the input {source}: it must not be the input, contain it "
                "or lie inside it"
            )


class ShardWriter:
    """Buffers tensors and writes `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes`
    (a larger tensor gets a shard of its own) plus `model.safetensors.index.json`, the layout
    `save_pretrained` writes."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}

    def holds(self, key: str) -> bool:
        return key in self.weight_map or key in self.buffer

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self.buffer[key] = tensor
        self.buffer_bytes += size

    def _flush(self) -> None:
        if not self.buffer:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.out_dir / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.buffer, name))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self, metadata: dict) -> dict[str, str]:
        """Write the last shard, rename all to the "-of-N" form and write the index; returns the weight map."""
        self._flush()
        total = len(self.files)
        renamed = {}
        for i, name in enumerate(self.files, 1):
            renamed[name] = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.out_dir / name, self.out_dir / renamed[name])
        self.weight_map = {k: renamed[v] for k, v in self.weight_map.items()}
        total_size = sum((self.out_dir / f).stat().st_size for f in renamed.values())
        index = {"metadata": {"total_size": total_size, **metadata}, "weight_map": self.weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        return self.weight_map


def check_new_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise `FileExistsError` when `output_dir` exists and `overwrite` is off (writers call it before any
    slow work; `atomic_folder` checks again)."""
    if Path(output_dir).exists() and not overwrite:
        raise FileExistsError(f"output directory {output_dir} already exists (pass --overwrite to replace it)")


@contextmanager
def atomic_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `output_dir`; when the block succeeds, give it ordinary
    permissions and rename it to `output_dir` (replacing an existing one only with `overwrite`). On any
    failure the temporary folder is removed and `output_dir` is left as it was.
    """
    output_dir = Path(output_dir)
    check_new_folder(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    (tmp / _OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield tmp
        (tmp / _OWNER_FILE).unlink()
        _publishable_permissions(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_folders(output_dir: Path) -> list[Path]:
    """Remove the temporary folders an earlier writer of `output_dir` left when it was killed (its process is
    gone); name, without touching them, the ones this code cannot attribute. Returns the folders removed."""
    removed = []
    for candidate in sorted(Path(output_dir).parent.glob(f".{Path(output_dir).name}.tmp-*")):
        owner = candidate / _OWNER_FILE
        try:
            host, pid = owner.read_text().split()
        except (OSError, ValueError):
            logger.warning("%s looks like an unfinished write of %s but has no owner record: remove it by hand",
                           candidate, output_dir)  # fmt: skip
            continue
        if host == socket.gethostname() and not _process_alive(int(pid)):
            logger.warning("removing %s, left by an interrupted write of %s (process %s)", candidate, output_dir, pid)
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _publishable_permissions(folder: Path) -> None:
    # mkdtemp makes a private (0700) folder; the result gets ordinary umask-based permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


_VERIFY_SCRIPT = r"""
import json, os, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModel

folder, dtype_name = sys.argv[1], sys.argv[2]
dtype = getattr(torch, dtype_name)
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
if not type(model).__module__.startswith("transformers_modules."):
    sys.exit(f"the model class came from {type(model).__module__}, not the folder's remote code")
index_file = os.path.join(folder, "model.safetensors.index.json")
shards = sorted(set(json.load(open(index_file))["weight_map"].values())) if os.path.isfile(index_file) else ["model.safetensors"]
state = model.state_dict()
for shard in shards:
    for key, tensor in load_file(os.path.join(folder, shard)).items():
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
if os.path.isfile(os.path.join(folder, "processor_config.json")):
    from transformers import AutoProcessor
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    if not type(processor).__module__.startswith("transformers_modules."):
        sys.exit(f"the processor class came from {type(processor).__module__}")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    if image_id != cfg.image_token_id:
        sys.exit(f"the processor's <image> id {image_id} differs from config.image_token_id {cfg.image_token_id}")
elif os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
    from transformers import AutoProcessor
    image_processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    if type(image_processor).__name__ != "LladaVImageProcessor":
        sys.exit(f"AutoProcessor gave a {type(image_processor).__name__}, not the image processor")
    if image_processor.crop_size != side:
        sys.exit(f"the image processor's crop size {image_processor.crop_size} differs from the model's {side}")
print("verified")
"""


def verify_in_fresh_process(folder: str | os.PathLike, dtype: torch.dtype) -> None:
    """Load `folder` with `trust_remote_code=True` in a new process that cannot import `llada_v`: the loaded
    parameters must equal the written ones, a text and an image forward must run, and the processor (when
    the folder has one) must load from the folder's code with `<image>` at `config.image_token_id` (or the
    image processor alone, with the model's crop size).

    Raises:
        RuntimeError: naming the last line the check printed.
    """
    folder = Path(folder).resolve()  # the check runs in another working directory
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    with tempfile.TemporaryDirectory() as modules_cache:
        env["HF_MODULES_CACHE"] = modules_cache
        result = subprocess.run(
            [sys.executable, "-c", _VERIFY_SCRIPT, str(folder), str(dtype).removeprefix("torch.")],
            cwd=modules_cache,
            env=env,
            capture_output=True,
            text=True,
        )
    if result.returncode != 0 or "verified" not in result.stdout:
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the folder does not load in a fresh process: {detail}")


__all__ = [
    "DTYPES",
    "REMOTE_CODE_FILES",
    "ShardWriter",
    "atomic_folder",
    "check_new_folder",
    "check_output_outside_inputs",
    "remove_stale_temp_folders",
    "parse_size",
    "verify_in_fresh_process",
    "write_remote_code",
]
