"""The fast tier's guard: a warning in pytest's terminal summary for every test not marked `@pytest.mark.slow` that
took longer than a fast test may (10 s by default, `LLADA_V_SLOW_TEST_SECONDS` sets another limit).

A warning, not a failure: a test's time depends on the machine and on what else runs on it. The time of a test is
its setup, call and teardown together, so a test that first builds a module-scoped fixture is charged for it (the
breakdown says so). conftest.py registers the report for every run of the suite.
"""

from __future__ import annotations

import os

LIMIT_ENV = "LLADA_V_SLOW_TEST_SECONDS"
DEFAULT_LIMIT_S = 10.0


def limit_seconds() -> float:
    """The limit in seconds: `$LLADA_V_SLOW_TEST_SECONDS` when set, else 10; a bad value is a `ValueError` naming it."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_LIMIT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{LIMIT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{LIMIT_ENV} must be positive, got {raw!r}")
    return value


class UnmarkedSlowTests:
    """A pytest plugin: sums each unmarked test's phase durations and lists those over the limit at the end."""

    def __init__(self, limit_s: float = DEFAULT_LIMIT_S):
        self.limit_s = limit_s
        self.phases: dict[str, dict[str, float]] = {}  # nodeid -> {"setup": s, "call": s, "teardown": s}

    def pytest_runtest_logreport(self, report) -> None:
        if "slow" in report.keywords:
            return
        self.phases.setdefault(report.nodeid, {})[report.when] = report.duration

    def over_limit(self) -> list[tuple[float, str, dict[str, float]]]:
        """(total seconds, test id, seconds per phase) of the unmarked tests over the limit, slowest first."""
        totals = [(sum(phases.values()), nodeid, phases) for nodeid, phases in self.phases.items()]
        return sorted((t for t in totals if t[0] > self.limit_s), key=lambda t: (-t[0], t[1]))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        slow = self.over_limit()
        if not slow:
            return
        terminalreporter.write_sep("=", "unmarked slow tests", yellow=True)
        terminalreporter.write_line(
            f"warning: {len(slow)} test(s) not marked @pytest.mark.slow took over {self.limit_s:g} s "
            "(setup + call + teardown); mark them slow or make them faster:",
            yellow=True,
        )
        for total, nodeid, phases in slow:
            parts = ", ".join(
                f"{when} {phases[when]:.1f} s"
                for when in ("setup", "call", "teardown")
                if phases.get(when, 0.0) >= 0.05
            )
            terminalreporter.write_line(f"  {total:6.1f} s  {nodeid} ({parts})")
