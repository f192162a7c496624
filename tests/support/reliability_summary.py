"""The reliability figures: a session-wide tally printed after the tests.

Reliability tests (``@pytest.mark.reliability``) take the ``reliability``
fixture and record what they did: faults injected and survived, crashes
survived, bad inputs tried, and rows lost. ``pytest_terminal_summary``
prints the tally whenever such tests ran, so ``make reliability`` (and
``make test``) end with one block a reviewer can read at a glance::

    ---------------- sa-envelope reliability ----------------
    faults injected: 142 (survived: 142)
    ...
    rows lost: 0

A figure is only counted once its test checked the outcome (the helpers
below are called after the assertions), so a failed test adds nothing.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field

import pytest

__all__ = ["Figures", "pytest_collection_modifyitems", "pytest_runtest_logreport", "pytest_terminal_summary", "reliability"]


@dataclass
class Figures:
    """Counters shared by every reliability test of the session."""

    faults: Counter[str] = field(default_factory=Counter)  # kind -> injected and survived
    crashes: Counter[str] = field(default_factory=Counter)  # kind -> survived
    bad_inputs: Counter[str] = field(default_factory=Counter)  # kind -> tried, all refused
    writers: int = 0  # concurrent first writers on a cold cache
    race_keys: int = 0  # keys those races created (bounded by ``writers``)
    secrets_searched: int = 0
    rows_checked: int = 0
    rows_lost: int = 0
    tests: int = 0

    def fault(self, kind: str, n: int = 1) -> None:
        """``n`` injected faults of ``kind`` were survived (clear error or success)."""
        self.faults[kind] += n

    def crash(self, kind: str, n: int = 1) -> None:
        """A crash of ``kind`` happened and recovery was checked."""
        self.crashes[kind] += n

    def bad_input(self, kind: str, n: int = 1) -> None:
        """``n`` tampered or bad inputs of ``kind`` were refused with our error."""
        self.bad_inputs[kind] += n

    def race(self, writers: int, keys: int) -> None:
        """``writers`` raced to write first under a cold cache and made ``keys`` keys."""
        self.writers += writers
        self.race_keys += keys

    def rows(self, checked: int, lost: int = 0) -> None:
        """``checked`` committed rows were read back; ``lost`` were missing or wrong."""
        self.rows_checked += checked
        self.rows_lost += lost

    def secret(self, n: int) -> None:
        """``n`` secrets were searched for in logs, echo, errors and reprs, and not found."""
        self.secrets_searched += n

    def lines(self) -> list[str]:
        def total(title: str, c: Counter[str]) -> list[str]:
            detail = "; ".join(f"{k} {v}" for k, v in sorted(c.items()))
            wrapped = textwrap.wrap(detail, 100, initial_indent="    ", subsequent_indent="    ")
            return [f"{title}: {sum(c.values())}", *wrapped]

        return [
            f"reliability tests passed: {self.tests}",
            *total("faults injected and survived", self.faults),
            *total("crashes survived", self.crashes),
            *total("bad inputs tried (each refused, or harmless as documented)", self.bad_inputs),
            f"first-key races: {self.writers} concurrent first writers made {self.race_keys} keys"
            " (bound: one table key per writer, one deterministic key per table)",
            f"secrets searched for in logs, echo, errors and reprs: {self.secrets_searched} (found: 0)",
            f"committed rows checked: {self.rows_checked}",
            f"rows lost: {self.rows_lost}",
        ]


_FIGURES = Figures()


@pytest.fixture
def reliability() -> Figures:
    """The session's figures (see the module docstring)."""
    return _FIGURES


_MARKED: set[str] = set()  # node ids of the tests marked ``reliability``


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Remember the tests the ``reliability`` marker selects: a report's
    keywords also hold node names, and tests/reliability/ is a package of
    that name, whose unmarked tests ``-m reliability`` does not run."""
    _MARKED.update(item.nodeid for item in items if item.get_closest_marker("reliability"))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and report.nodeid in _MARKED:
        _FIGURES.tests += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the tally if any reliability test ran."""
    figures = _FIGURES
    if not (figures.tests or figures.faults or figures.crashes or figures.bad_inputs):
        return
    terminalreporter.section("sa-envelope reliability")
    for line in figures.lines():
        terminalreporter.write_line(line)
