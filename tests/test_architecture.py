"""The layout rules of `src/llada_v` (docs/architecture.md), read from the source with `ast`:

- no import cycle anywhere in the package;
- `checkpoint_io.REMOTE_CODE_FILES` is exactly the set of remote-code modules: what transformers copies for the
  model and the processor, the repository root's links, the demo checkpoint's files and a converted folder's;
- the remote-code modules import only the standard library, torch, transformers, PIL, numpy and each other, each
  name from the module that defines it (the attention layer takes the cache from `cache_llada_v`, not from the
  sampler), and none is longer than 1,000 lines;
- no function is longer than 80 lines (docstring excluded) unless its first comment says why.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

from llada_v.checkpoint_io import REMOTE_CODE_FILES
from llada_v.demo.model import demo_model_dir

from paths import REPO

SRC = REPO / "src" / "llada_v"
ALLOWED_TOP_LEVEL = {"torch", "transformers", "PIL", "numpy"}
MAX_FUNCTION_LINES = 80
MAX_REMOTE_MODULE_LINES = 1000


def _package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (the demo checkpoint's links excluded)."""
    modules = {}
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC.parent)
        if "checkpoint" in relative.parts:
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports anywhere in its file (function-level imports included)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from x import y` imports the module x.y when y is one, else x.
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names
            ]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    modules = _package_modules()
    graph = {name: _imported_modules(name, path, modules) for name, path in modules.items()}
    assert "llada_v.modeling_llada_v" in graph["llada_v.training.trainer"]  # the walk sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_remote_code_files_are_what_the_model_and_processor_reach():
    # transformers copies a class's module and every module it reaches through `from .x import`.
    todo, reached = ["modeling_llada_v.py", "processing_llada_v.py"], set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        for node in ast.walk(ast.parse((SRC / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                # transformers only follows `from .module import X` (no packages, no `from . import x`).
                assert node.level == 1 and node.module and "." not in node.module, f"{name}: {ast.unparse(node)}"
                todo.append(f"{node.module}.py")
    assert reached == set(REMOTE_CODE_FILES)


def _relative_imports(name: str) -> set[str]:
    return {
        f"{node.module}.py"
        for node in ast.walk(ast.parse((SRC / name).read_text()))
        if isinstance(node, ast.ImportFrom) and node.level and node.module
    }


def test_each_entry_module_imports_every_remote_module_it_reaches_itself():
    # transformers 4.57 (the oldest supported release) copies into its module cache only the files the loaded
    # module imports itself, not the files those import: each module an Auto class loads must import them all.
    for entry in (
        "configuration_llada_v.py",
        "modeling_llada_v.py",
        "processing_llada_v.py",
        "image_processing_llada_v.py",
    ):
        todo, reached = list(_relative_imports(entry)), set()
        while todo:
            name = todo.pop()
            if name not in reached:
                reached.add(name)
                todo += _relative_imports(name)
        missing = reached - _relative_imports(entry) - {entry}
        assert not missing, f"{entry} reaches {sorted(missing)} only through other modules: import them directly"


def test_remote_code_imports_nothing_package_only():
    for name in REMOTE_CODE_FILES:
        for node in ast.walk(ast.parse((SRC / name).read_text())):
            if isinstance(node, ast.Import):
                tops = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom):
                assert f"{node.module}.py" in REMOTE_CODE_FILES, f"{name}: {ast.unparse(node)}"
                continue
            else:
                continue
            for top in tops:
                assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names, f"{name}: {ast.unparse(node)}"


def _defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments), not those it imports."""
    names = set()
    body = list(ast.parse(path.read_text()).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.If, ast.Try)):  # definitions that depend on a condition (compat_llada_v)
            body += (
                node.body
                + node.orelse
                + getattr(node, "finalbody", [])
                + sum((handler.body for handler in getattr(node, "handlers", [])), [])
            )
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_remote_code_imports_each_name_from_its_owner():
    # Re-exports (`from .generation_utils import LladaVGenerationConfig`) are for users; inside the remote code a
    # name comes from the module that defines it, so the import graph shows who depends on what.
    for name in REMOTE_CODE_FILES:
        for node in ast.walk(ast.parse((SRC / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                owner = _defined_names(SRC / f"{node.module}.py")
                if node.module == "compat_llada_v":  # the one owner of what differs between transformers releases
                    owner |= set(ast.literal_eval(next(
                        n.value for n in ast.parse((SRC / "compat_llada_v.py").read_text()).body
                        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__"
                    )))  # fmt: skip
                borrowed = [alias.name for alias in node.names if alias.name not in owner]
                assert not borrowed, f"{name}: {borrowed} are not defined in {node.module}.py"
    modeling = ast.parse((SRC / "modeling_llada_v.py").read_text())
    cache_imports = [n.module for n in ast.walk(modeling) if isinstance(n, ast.ImportFrom)
                     and any(a.name == "LladaVDiffusionCache" for a in n.names)]  # fmt: skip
    assert cache_imports == ["cache_llada_v"]


def test_the_owner_check_sees_a_re_export():
    assert "LladaVGenerationConfig" in _defined_names(SRC / "generation_config_llada_v.py")
    assert "LladaVGenerationConfig" not in _defined_names(SRC / "generation_utils.py")  # imported there, re-exported


def test_no_remote_code_module_is_longer_than_1000_lines():
    lengths = {name: len((SRC / name).read_text().splitlines()) for name in REMOTE_CODE_FILES}
    assert lengths["generation_utils.py"] > 100  # the files are read
    long = {name: n for name, n in lengths.items() if n > MAX_REMOTE_MODULE_LINES}
    assert not long, f"remote-code modules over {MAX_REMOTE_MODULE_LINES} lines: {long}"


def test_package_only_flat_modules_are_not_remote_code():
    flat = {p.name for p in SRC.glob("*.py")}
    assert set(REMOTE_CODE_FILES) <= flat
    assert flat - set(REMOTE_CODE_FILES) == {
        "__init__.py",
        "arguments.py",
        "checkpoint_io.py",
        "cli.py",
        "inference.py",
    }


HELP_PROBE = """
import sys
from llada_v import cli
try:
    cli.build_parser().parse_args(sys.argv[1:])
except SystemExit:
    pass
print("imported:", ",".join(m for m in ("torch", "transformers", "PIL", "numpy", "ray", "peft") if m in sys.modules))
"""


def test_the_command_line_parses_without_torch_or_transformers():
    """`llada-v --help`, every command's `--help` and argument errors are answered by the standard library alone
    (the start-up time docs/cli.md quotes)."""
    for argv in (["--help"], *([c, "--help"] for c in ("generate", "chat", "convert", "demo", "eval-demo", "serve")),
                 ["generate"], ["convert", "--bogus"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", HELP_PROBE, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        last = result.stdout.rstrip("\n").split("\n")[-1]
        assert last == "imported: ", f"llada-v {' '.join(argv)}: {last}"


def test_repository_root_links_every_remote_code_file():
    links = {p.name for p in REPO.glob("*.py")}
    assert links == set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:
        link = REPO / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), f"{name} must be a relative symlink"
        assert link.resolve() == (SRC / name).resolve()


def test_demo_checkpoint_holds_exactly_the_remote_code_files():
    folder = demo_model_dir()
    assert {p.name for p in folder.glob("*.py")} == set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:  # links, so the shipped code is the package's own
        assert (folder / name).resolve() == (SRC / name).resolve()


def test_a_converted_folder_holds_exactly_the_remote_code_files(golden_checkpoint):
    assert {p.name for p in Path(golden_checkpoint).glob("*.py")} == set(REMOTE_CODE_FILES)
    for name in REMOTE_CODE_FILES:
        assert (Path(golden_checkpoint) / name).read_bytes() == (SRC / name).read_bytes()


def _long_functions() -> list[str]:
    long = []
    for path in sorted(_package_modules().values()):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            length = node.end_lineno - node.lineno + 1
            if (
                isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                length -= body[0].end_lineno - body[0].lineno + 1
                body = body[1:] or body
            first_code = lines[body[0].lineno - 2].strip() if body else ""
            if length > MAX_FUNCTION_LINES and not first_code.startswith("#"):
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({length} lines)")
    return long


def test_no_function_is_longer_than_80_lines_without_saying_why():
    assert _long_functions() == []
