"""Crash scenarios: fail a job at each of its fault points, then recover.

The package calls :func:`sa_envelope.faults.fault_point` before and after
every storage write of key creation (and, as they land, rewrap, re-encryption
and column encryption). A :class:`CrashScenario` names a job, the points it
passes, how to prepare the database for it, and what must hold after a crash
at any of those points. The tests fail the job at each point in turn, twice:

* **raise**: the hook raises :class:`InjectedFault` in the test process (a
  bug, a lost connection, a kill by the framework);
* **exit**: the job runs in a subprocess (``python -m reliability.worker``) whose
  hook calls ``os._exit`` at the point: no ``finally``, no rollback, no
  goodbye to the database, as with a power cut or the OOM killer.

Then ``verify(ctx, crashed=True)`` checks the state the crash left,
the job is run again to the end (``resume``) and ``verify(ctx,
crashed=False)`` checks the finished state.

A third test kills the job with a real SIGKILL at a random moment: the
worker prints each fault point it passes (``job NAME``), and the parent
kills it after a randomly chosen one, so the signal lands somewhere in the
work that follows. The state is then one the job may legitimately be in at
any moment, so ``verify(ctx, crashed=None)`` must accept every consistent
state (nothing done yet, partly done where the job commits in steps, or
finished) and reject anything else.

Adding a job (rewrap, re-encryption, column encryption) is one call::

    register(CrashScenario(
        name="rewrap",
        points=("rewrap.key.before_update", "rewrap.key.after_update"),
        prepare=..., run=..., verify=...,
    ))

and :func:`declared_points` (the package's ``faults.POINTS`` registry) makes
the suite fail while any fault point of the package has no scenario.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from sa_envelope import KeyProvider, LocalKeyProvider
from sa_envelope import faults
from sa_envelope.envelope import format as fmt

from support import ROOT, TESTS
from support.models import ENCRYPTED_COLUMNS, Schema, schema

from .rows import check_rows

__all__ = [
    "CRASH_EXIT",
    "CrashContext",
    "CrashScenario",
    "InjectedFault",
    "SCENARIOS",
    "WORKER",
    "count_checked_rows",
    "declared_points",
    "exit_at",
    "kill_after",
    "orphan_values",
    "raise_at",
    "register",
    "run_worker",
    "start_worker",
    "worker_env",
]

CRASH_EXIT = 77  # the exit status of a worker killed at a fault point
WORKER = "reliability.worker"  # run as ``python -m``, with tests/ on PYTHONPATH


class InjectedFault(RuntimeError):
    """Raised at a fault point by :func:`raise_at` (deliberately not ours)."""


@dataclass
class CrashContext:
    """What a job needs, rebuildable in a subprocess from two strings."""

    url: str
    keyfile: str
    tables: tuple[str, ...] = ("patients", "visits")
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.url)
        return self._engine

    @property
    def provider(self) -> LocalKeyProvider:
        return LocalKeyProvider.from_file(self.keyfile)

    def schema(self) -> Schema:
        """A fresh KeyManager (cold cache) over the scenario's tables."""
        return schema(self.engine, self.provider, self.tables)

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


@dataclass(frozen=True)
class CrashScenario:
    """A job, the fault points it passes, and what must hold around a crash."""

    name: str
    points: tuple[str, ...]
    prepare: Callable[[CrashContext], None]
    run: Callable[[CrashContext], None]
    verify: Callable[[CrashContext, bool | None], int]  # -> committed rows checked
    occurrences: int = 1  # how many times the job passes each point


SCENARIOS: dict[str, CrashScenario] = {}


def register(scenario: CrashScenario) -> CrashScenario:
    SCENARIOS[scenario.name] = scenario
    return scenario


# -- injecting -------------------------------------------------------------------------


@contextlib.contextmanager
def _at(point: str, occurrence: int, action: Callable[[], None]) -> Iterator[list[str]]:
    """Run ``action`` the ``occurrence``-th time ``point`` is passed; yield
    the list of points passed so far (to prove the point was reached)."""
    seen: list[str] = []

    def hook(name: str) -> None:
        seen.append(name)
        if name == point and seen.count(name) == occurrence:
            action()

    with faults.inject(hook):
        yield seen


def raise_at(point: str, occurrence: int = 1) -> contextlib.AbstractContextManager[list[str]]:
    def fail() -> None:
        raise InjectedFault(f"injected at {point}")

    return _at(point, occurrence, fail)


def exit_at(point: str, occurrence: int = 1) -> contextlib.AbstractContextManager[list[str]]:
    return _at(point, occurrence, lambda: os._exit(CRASH_EXIT))


def declared_points() -> set[str]:
    """Every fault point the package declares (``sa_envelope.faults.POINTS``)."""
    return set(faults.POINTS)


# -- subprocesses ----------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """The environment for ``python -m reliability.worker``: tests/ and the
    package importable, whatever the working directory."""
    env = dict(os.environ)
    paths = [str(TESTS), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_worker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the worker to its end (or its crash) and return what happened."""
    return subprocess.run(
        [sys.executable, "-m", WORKER, *args],
        env=worker_env(), capture_output=True, text=True, timeout=timeout,
    )


def kill_after(proc: subprocess.Popen[str], stop: Callable[[str], bool], *, resume: bool = False) -> str | None:
    """Read ``proc``'s output lines until ``stop(line)``, then SIGKILL it at
    once (it is mid-work); return that line, or None if the job ended first.

    ``resume``: the worker waits at each line for "go" (``job``): send it for
    every line before the chosen one, so the kill lands exactly there, not
    wherever a loaded machine let the worker run on to."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if stop(line.strip()):
            proc.kill()  # SIGKILL on POSIX
            proc.wait(timeout=30)
            return line.strip()
        if resume and proc.stdin is not None:
            proc.stdin.write("go\n")
            proc.stdin.flush()
    proc.wait(timeout=30)
    return None


def start_worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", WORKER, *args],
        env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


# -- checks ----------------------------------------------------------------------------


def orphan_values(engine: Engine, tables: tuple[str, ...]) -> int:
    """Stored values whose header names a key the key table does not hold:
    values no process will ever decrypt (the thing a crash must never leave)."""
    with engine.connect() as conn:
        keys = {int(k) for k in conn.execute(text("SELECT id FROM sa_envelope_keys")).scalars()}
        orphans = 0
        for table in tables:
            cols = ", ".join(ENCRYPTED_COLUMNS)
            for row in conn.execute(text(f"SELECT {cols} FROM {table}")):
                for value in row:
                    if value is not None and fmt.read_header(bytes(value))[1] not in keys:
                        orphans += 1
    return orphans


def count_checked_rows(ctx: CrashContext, table: str, ns: range, provider: KeyProvider | None = None) -> int:
    """Asserts that all of ``ns`` in ``table`` decrypt to their values (keys
    unwrapped by ``provider``, by default the context's); returns how many."""
    result = check_rows(ctx.engine, ctx.provider if provider is None else provider, table, ns)
    assert result == (len(ns), 0), f"{table}: checked, lost = {result}"
    return len(ns)
