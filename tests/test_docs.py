"""The docs test: every fenced shell or Python block in README.md and docs/ runs, so the docs cannot drift.

The rule (also in README.md, "Documentation blocks are tested"):

- Blocks: fences tagged ```bash, ```sh, ```shell, ```console (the `$ ` lines are the commands, the other lines
  their output, not compared), ```python or ```py, in README.md and docs/**/*.md. docs/history/ is not
  collected: it is an archive of past runs (demo training, benchmarks, training) whose commands used the code
  of their time.
  Other tags (yaml, json, text, untagged diagrams) are not run.
- A block that cannot run on a CPU here (GPU, the 8B weights, the Hub or the network, placeholders to fill in,
  a long run) carries `<!-- docs-test: skip: <reason> -->` on the line right before its opening fence. That is
  the only marker: an empty reason, any other `docs-test` marker, or a marker not directly before a fence fails
  the test of that file.
- Each block runs on its own, in document order, in a fresh process: bash blocks with `bash -euo pipefail`,
  Python blocks with this interpreter. Blocks of one file share one temporary working folder, so a block may
  use a file an earlier block of the same file wrote (no variables carry over). That folder holds a link
  `examples` to the repository's examples/, so paths such as `examples/lmms_eval_task` work as they do from a
  clone's root; `$REPO` is the repository root; this interpreter's bin/ is first on PATH (`python`, `llada-v`);
  the Hub and datasets are offline and `HF_HOME` is a folder of the test's own.
- A failing block's test id is its file and the line of its opening fence, e.g. `docs/usage.md:42`.

The block tests start processes that import torch (seconds each): they are marked slow. The collection and
marker checks are fast.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import doc_files
from paths import REPO

BASH_TAGS = {"bash", "sh", "shell", "console"}
PYTHON_TAGS = {"python", "py"}
BLOCK_TIMEOUT_S = 300
MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip:(?P<reason>.*)$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<tag>[\w+-]*)")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its tag and code, and the reason it is skipped (None: it runs)."""

    path: str  # relative to the repository, e.g. "docs/usage.md"
    line: int  # 1-based line of the opening fence
    tag: str
    code: str
    skip_reason: str | None

    @property
    def runnable(self) -> bool:
        return self.tag in BASH_TAGS or self.tag in PYTHON_TAGS

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


class MarkerError(ValueError):
    """A `docs-test` marker that is malformed, unknown or not directly before a fence."""


def parse_marker(text: str, where: str) -> str | None:
    """The skip reason of a marker line, None when the line is no marker; `MarkerError` when it is a bad one."""
    match = MARKER.match(text)
    if match is None:
        if text.lstrip().startswith("<!--") and "docs-test" in text:
            raise MarkerError(
                f"{where}: malformed docs-test marker {text.strip()!r}; write '<!-- docs-test: skip: <reason> -->'"
            )
        return None
    skip = SKIP.match(match["body"])
    if skip is None:
        raise MarkerError(
            f"{where}: unknown docs-test marker {text.strip()!r}; the only marker is "
            "'<!-- docs-test: skip: <reason> -->'"
        )
    reason = skip["reason"].strip()
    if not reason:
        raise MarkerError(f"{where}: a docs-test skip marker needs a reason: {text.strip()!r}")
    return reason


def parse_blocks(text: str, path: str) -> list[Block]:
    """Every fenced block of a Markdown text, with its skip reason; `MarkerError` on a bad or stray marker."""
    lines = text.splitlines()
    blocks, i = [], 0
    pending: tuple[int, str] | None = None  # (line, reason) of a marker waiting for its fence
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            if pending is not None:
                raise MarkerError(f"{path}:{pending[0]}: a docs-test marker must be on the line right before a fence")
            reason = parse_marker(lines[i], f"{path}:{i + 1}")
            pending = None if reason is None else (i + 1, reason)
            i += 1
            continue
        start, closing = i, fence["indent"] + fence["fence"]
        i += 1
        while i < len(lines) and not lines[i].startswith(closing):
            i += 1
        code = textwrap.dedent("\n".join(lines[start + 1 : i])) + "\n"
        blocks.append(Block(path, start + 1, fence["tag"].lower(), code, pending[1] if pending else None))
        pending = None
        i += 1  # past the closing fence
    if pending is not None:
        raise MarkerError(f"{path}:{pending[0]}: a docs-test marker must be on the line right before a fence")
    return blocks


def collect(root: Path = REPO) -> tuple[list[Block], list[str]]:
    """The runnable blocks of every doc file, and the marker errors (one per file that has one)."""
    blocks, errors = [], []
    for file in doc_files(root):
        try:
            blocks += [
                b
                for b in parse_blocks(file.read_text(encoding="utf-8"), file.relative_to(root).as_posix())
                if b.runnable
            ]
        except MarkerError as err:
            errors.append(str(err))
    return blocks, errors


def console_commands(code: str) -> str:
    """The commands of a console transcript: its `$ ` lines (with `\\` continuations)."""
    commands, continuing = [], False
    for line in code.splitlines():
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


# ---------------------------------------------------------------------------------------------- the parser


def test_parser_reads_tags_indented_blocks_and_skip_reasons():
    text = textwrap.dedent("""\
        Intro.

        <!-- docs-test: skip: needs a GPU -->
        ```bash
        nvidia-smi
        ```

        - a list item:

          ```python
          print("indented")
          ```

        ```yaml
        a: 1
        ```
        """)
    blocks = parse_blocks(text, "x.md")
    assert [(b.line, b.tag, b.skip_reason, b.runnable) for b in blocks] == [
        (4, "bash", "needs a GPU", True),
        (10, "python", None, True),
        (14, "yaml", None, False),
    ]
    assert blocks[1].code == 'print("indented")\n' and blocks[1].id == "x.md:10"


@pytest.mark.parametrize(
    "marker, message",
    [
        ("<!-- docs-test: skip: -->", "needs a reason"),
        ("<!-- docs-test: skip:    -->", "needs a reason"),
        ("<!-- docs-test: slow -->", "unknown docs-test marker"),
        ("<!-- docs-test: skip -->", "unknown docs-test marker"),
        ("<!-- docs-test skip: GPU -->", "malformed docs-test marker"),
    ],
)
def test_bad_markers_are_refused(marker, message):
    with pytest.raises(MarkerError, match=message):
        parse_blocks(f"{marker}\n```bash\ntrue\n```\n", "x.md")


def test_a_marker_must_be_right_before_its_fence():
    with pytest.raises(MarkerError, match="x.md:1: .*right before a fence"):
        parse_blocks("<!-- docs-test: skip: GPU -->\n\n```bash\ntrue\n```\n", "x.md")
    with pytest.raises(MarkerError, match="right before a fence"):
        parse_blocks("text\n<!-- docs-test: skip: GPU -->\n", "x.md")


def test_console_blocks_run_their_dollar_lines():
    assert console_commands("$ echo a \\\n    b\na b\n$ true\n") == "echo a \\\n    b\ntrue\n"


def test_history_is_an_archive_and_not_collected():
    names = [f.relative_to(REPO).as_posix() for f in doc_files()]
    assert "README.md" in names and "docs/usage.md" in names
    assert not any(n.startswith("docs/history/") for n in names)


def test_every_doc_file_has_valid_markers():
    _, errors = collect()
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------------- the blocks

BLOCKS, _ = collect()


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One working folder per doc file, shared by its blocks in document order (see the module docstring)."""
    folders: dict[str, Path] = {}

    def folder_for(path: str) -> Path:
        if path not in folders:
            folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", path))
            (folder / "examples").symlink_to(REPO / "examples", target_is_directory=True)
            folders[path] = folder
        return folders[path]

    return folder_for


def block_env(workdir: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "REPO": str(REPO),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(workdir / ".hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.skip_reason is None], ids=lambda b: b.id)
def test_doc_block_runs(block, workdirs):
    workdir = workdirs(block.path)
    if block.tag in PYTHON_TAGS:
        command = [sys.executable, "-c", block.code]
    else:
        code = console_commands(block.code) if block.tag == "console" else block.code
        command = ["bash", "-euo", "pipefail", "-c", code]
    try:
        result = subprocess.run(
            command, cwd=workdir, env=block_env(workdir), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id}: still running after {BLOCK_TIMEOUT_S} s; make it quicker or mark it skipped")
    assert result.returncode == 0, (
        f"{block.id} ({block.tag}) exited with {result.returncode}\n--- block\n{block.code}--- output (tail)\n"
        f"{(result.stdout + result.stderr)[-4000:]}"
    )
