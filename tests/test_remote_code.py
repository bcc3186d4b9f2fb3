"""The checkpoint folder works as Hub remote code: fresh process, `llada_v` not importable."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from paths import REPO

SRC = REPO / "src" / "llada_v"
REMOTE_FILES = ["modeling_llada_v.py", "configuration_llada_v.py", "processing_llada_v.py", "generation_utils.py"]
ALLOWED_TOP_LEVEL = {"torch", "transformers", "PIL", "numpy"}


def _remote_modules() -> list[Path]:
    """The remote-code files and every sibling they import with `from .x import`."""
    todo, seen = [SRC / f for f in REMOTE_FILES], []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                todo.append(SRC / f"{node.module}.py")
    return seen


def test_top_level_remote_code_files_are_symlinks_into_src():
    for name in REMOTE_FILES:
        link = REPO / name
        assert link.is_symlink(), name
        assert not os.path.isabs(os.readlink(link)), f"{name} must be a relative symlink"
        assert link.resolve() == (SRC / name).resolve()


def test_remote_code_imports_only_allowed_modules():
    for path in _remote_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, (
                        f"{path.name}: import {alias.name}"
                    )
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    top = node.module.split(".")[0]
                    assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, (
                        f"{path.name}: from {node.module}"
                    )
                else:
                    # transformers only discovers `from .module import X` (no packages, no `from . import x`).
                    assert node.level == 1 and node.module and "." not in node.module, (
                        f"{path.name}: relative import must be `from .module import X`"
                    )
                    assert (SRC / f"{node.module}.py").is_file()


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    sys.modules["llada_v"] = None  # make the package unimportable: only the folder's code may be used
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModel

    folder, pixels, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(2)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules."), type(config).__module__
    ids = [126080, 126346, 9125, 126347, 271, 40, 41, 42, 126348, 126346, 882, 126347, 271]
    ids += [config.image_token_id] * 981 + [198, 5501, 7664, 279, 2217, 13, 126348, 126346, 598, 126347, 271]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=load_file(pixels)["pixel_values"][0],
                       image_sizes=torch.tensor([[100, 300]])).logits[0]
    save_file({"argmax": logits.argmax(-1), "last8": logits[-8:].contiguous()}, out)
    """
)


def test_converted_checkpoint_loads_as_remote_code_in_a_fresh_process(golden_checkpoint, golden_dir, tmp_path):
    out = tmp_path / "out.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            str(golden_checkpoint),
            str(golden_dir / "tensors" / "pixels_wide_300x100.safetensors"),
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = load_file(out)
    golden = load_file(golden_dir / "tensors" / "forward_wide_300x100.safetensors")
    margin = golden["top1_top2_margin"]
    assert torch.equal(got["argmax"][margin >= 2e-4], golden["argmax"][margin >= 2e-4])
    torch.testing.assert_close(got["last8"], golden["logits_last8"], atol=1e-4, rtol=0)
