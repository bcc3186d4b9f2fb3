"""The test suite's own rules.

- The fast tier's guard (slow_report.py, registered by conftest.py): unmarked tests over the limit are listed in
  the terminal summary as a warning, marked and quick ones are not, and the run still passes.
- Test modules share helpers through helpers.py (and tiny.py, paths.py, ...), never by importing another test
  module: that runs the other module's module-level code and ties the two together, so one cannot be edited,
  moved or deleted without breaking the other.
"""

import ast
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from paths import REPO
from slow_report import LIMIT_ENV, UnmarkedSlowTests, limit_seconds

# The session's conftest registers the report as conftest.py does, without the suite's fixtures (no torch import).
CONFTEST = textwrap.dedent("""\
    from slow_report import UnmarkedSlowTests, limit_seconds


    def pytest_configure(config):
        config.pluginmanager.register(UnmarkedSlowTests(limit_seconds()), "unmarked-slow-tests")
    """)

SESSION = textwrap.dedent("""\
    import time

    import pytest


    @pytest.fixture(scope="module")
    def slow_fixture():
        time.sleep(0.6)


    def test_quick():
        pass


    def test_sleepy():
        time.sleep(0.6)


    def test_sleepy_setup(slow_fixture):
        pass


    @pytest.mark.slow
    def test_marked():
        time.sleep(0.6)
    """)


def run_session(tmp_path, limit: str) -> subprocess.CompletedProcess:
    """A pytest run of SESSION in a fresh process, with the report registered."""
    (tmp_path / "test_session.py").write_text(SESSION)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: long-running\n")
    path = os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, LIMIT_ENV: limit, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_session.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unmarked_tests_over_the_limit_are_reported_as_a_warning(tmp_path):
    result = run_session(tmp_path, "0.4")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "4 passed" in out
    summary = out[out.index("unmarked slow tests") :]
    assert "warning: 2 test(s) not marked @pytest.mark.slow took over 0.4 s" in summary
    assert "test_session.py::test_sleepy (call" in summary
    assert "test_session.py::test_sleepy_setup (setup" in summary  # the fixture it built is charged to it
    assert "test_quick" not in summary and "test_marked" not in summary


class Terminal:
    """Records what the report writes (pytest's TerminalReporter has these two methods)."""

    def __init__(self):
        self.lines = []

    def write_sep(self, sep, title, **markup):
        self.lines.append(title)

    def write_line(self, line, **markup):
        self.lines.append(line)


def report(nodeid, when, duration, slow=False):
    return SimpleNamespace(nodeid=nodeid, when=when, duration=duration, keywords={"slow": 1} if slow else {})


def test_phases_add_up_and_marked_or_quick_tests_are_not_reported():
    plugin, terminal = UnmarkedSlowTests(10.0), Terminal()
    for r in [
        report("t::a", "setup", 6.0),
        report("t::a", "call", 4.5),
        report("t::a", "teardown", 0.0),
        report("t::b", "call", 9.9),
        report("t::c", "call", 30.0, slow=True),
    ]:
        plugin.pytest_runtest_logreport(r)
    assert [(total, nodeid) for total, nodeid, _ in plugin.over_limit()] == [(10.5, "t::a")]
    plugin.pytest_terminal_summary(terminal)
    assert terminal.lines[2] == "    10.5 s  t::a (setup 6.0 s, call 4.5 s)"

    quiet, terminal = UnmarkedSlowTests(10.0), Terminal()
    quiet.pytest_runtest_logreport(report("t::b", "call", 9.9))
    quiet.pytest_terminal_summary(terminal)
    assert terminal.lines == []


def test_this_suite_registers_the_report(request):
    plugin = request.config.pluginmanager.get_plugin("unmarked-slow-tests")
    assert isinstance(plugin, UnmarkedSlowTests) and plugin.limit_s == limit_seconds()


@pytest.mark.parametrize("raw, expected", [(None, 10.0), ("", 10.0), ("2.5", 2.5)])
def test_limit_from_the_environment(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(LIMIT_ENV, raising=False)
    else:
        monkeypatch.setenv(LIMIT_ENV, raw)
    assert limit_seconds() == expected


@pytest.mark.parametrize(
    "raw, message",
    [("ten", "must be a number of seconds, got 'ten'"), ("0", "must be positive, got '0'"), ("-1", "must be positive")],
)
def test_a_bad_limit_is_refused_naming_the_value(monkeypatch, raw, message):
    monkeypatch.setenv(LIMIT_ENV, raw)
    with pytest.raises(ValueError, match=message):
        limit_seconds()


def test_no_test_module_imports_another():
    offenders = []
    for module in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [
                f"{module.name}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0].startswith("test_")
            ]
    assert not offenders, "move shared helpers to tests/helpers.py:\n" + "\n".join(offenders)
