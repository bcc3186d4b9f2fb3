"""Training checkpoints that are whole or absent, and the newest whole one to resume from.

Package-only code. `LladaVTrainer._save_checkpoint` writes `checkpoint-N` under the staging name
`.checkpoint-N.partial` (every rank writes there) and renames it once every file is written, so a run killed while
saving leaves no `checkpoint-N` behind. `last_complete_checkpoint` is what `--resume_from_checkpoint last` resumes
from: the highest `checkpoint-N` that passes `checkpoint_problem` (folders written by older versions, or damaged
later, can still be partial); the ones it passes over are logged with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR-N
TRAINER_STATE_NAME = "trainer_state.json"
_TORCH_ARCHIVES = (".pt", ".pth", ".bin")  # torch.save writes zip archives


def staging_dir(final_dir: str | os.PathLike) -> Path:
    """Where `final_dir` (`.../checkpoint-N`) is written before the rename: the same path on every rank, and a
    name that transformers' checkpoint pattern never matches (resume and rotation do not see it)."""
    final_dir = Path(final_dir)
    return final_dir.parent / f".{final_dir.name}.partial"


def remove_staging_dirs(run_dir: str | os.PathLike) -> None:
    """Remove the staging folders a killed save left in `run_dir`."""
    for stale in Path(run_dir).glob(".checkpoint-*.partial"):
        logger.warning("removing %s, left by an interrupted checkpoint save", stale)
        shutil.rmtree(stale, ignore_errors=True)


def publish(staged: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Rename the fully written `staged` folder to `final_dir` (replacing an older folder of that name)."""
    if os.path.lexists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(staged, final_dir)


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"{path.name} is truncated ({size} bytes, no header)"
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            return f"{path.name} is truncated (header of {header_len} bytes, file of {size})"
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{path.name} has an unreadable header ({err})"
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path.name} has {size} bytes, its header describes {expected}"
    return None


def _archive_problem(path: Path) -> str | None:
    # The zip's central directory is at the end of the file: a truncated archive has none.
    try:
        with zipfile.ZipFile(path) as archive:
            size = path.stat().st_size
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{path.name} is truncated (member {info.filename} ends past the file)"
    except zipfile.BadZipFile as err:
        return f"{path.name} is not a complete archive ({err})"
    return None


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from, or None when it looks whole: `trainer_state.json` parses; every
    safetensors file has a readable header and exactly the size it describes; every torch archive (`optimizer.pt`,
    `scheduler.pt`, RNG states, DeepSpeed's files) is a complete zip. Reads headers and zip directories only."""
    folder = Path(folder)
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        json.loads(state.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE_NAME} does not parse ({err})"
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in _TORCH_ARCHIVES:
            problem = _archive_problem(path)
        else:
            continue
        if problem:
            return problem
    return None


def last_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The `checkpoint-N` of `run_dir` with the highest N that `checkpoint_problem` finds whole; each newer one
    passed over is logged with its reason. None when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    names = [(CHECKPOINT_NAME.match(p.name), p) for p in run_dir.iterdir() if p.is_dir()]
    candidates = [(int(m.group(1)), p) for m, p in names if m]
    for _, folder in sorted(candidates, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("not resuming from %s: it is incomplete (%s)", folder, problem)
    return None


__all__ = [
    "CHECKPOINT_NAME",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "publish",
    "remove_staging_dirs",
    "staging_dir",
]
