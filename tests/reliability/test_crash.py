"""Crashes: a SIGKILL in the middle of a bulk insert, and a failure at each
fault point of each job (key creation now; rewrap, re-encryption and column
encryption register their scenarios in reliability/scenarios.py as they land).

Promises: every committed row decrypts after a restart, nothing half-written
survives (no value under a key that is not stored), the job runs again to
the end, and the counts match.
"""

from __future__ import annotations

import random
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy.exc import StatementError

from reliability import scenarios  # noqa: F401 - registers the scenarios
from reliability.crash import (
    CRASH_EXIT,
    SCENARIOS,
    CrashContext,
    InjectedFault,
    declared_points,
    kill_after,
    orphan_values,
    raise_at,
    run_worker,
    start_worker,
)
from reliability.rows import check_rows, count_rows

pytestmark = pytest.mark.reliability

BULK_ROWS = 3000
BATCH = 250
CASES = [
    pytest.param(s.name, point, k, id=f"{s.name}-{point.rsplit('.', 1)[1]}-{k}")
    for s in SCENARIOS.values()
    for point in s.points
    for k in range(1, s.occurrences + 1)
]


@pytest.fixture
def ctx(db_url: str, tmp_path: Path) -> Iterator[CrashContext]:
    context = CrashContext(db_url, str(tmp_path / "master.key"))
    try:
        yield context
    finally:
        context.dispose()


def test_every_fault_point_has_a_scenario() -> None:
    """A new fault_point in the package must come with a crash scenario."""
    covered = {p for s in SCENARIOS.values() for p in s.points}
    assert declared_points() - covered == set(), "add a CrashScenario in tests/reliability/scenarios.py"
    assert covered - declared_points() == set(), "a scenario names a point the package no longer has"


def _caused_by_injection(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, InjectedFault):
            return True
        exc = exc.__cause__ or (exc.orig if isinstance(exc, StatementError) else None)  # type: ignore[assignment]
    return False


def _recover(ctx: CrashContext, name: str) -> int:
    """Check what the crash left, finish the job, check the end state."""
    scenario = SCENARIOS[name]
    checked = scenario.verify(ctx, True)
    scenario.run(ctx)
    return checked + scenario.verify(ctx, False)


@pytest.mark.parametrize("name, point, occurrence", CASES)
def test_raise_at_fault_point(ctx: CrashContext, name: str, point: str, occurrence: int, reliability: Any) -> None:
    scenario = SCENARIOS[name]
    scenario.prepare(ctx)
    with pytest.raises(Exception) as info, raise_at(point, occurrence) as seen:
        scenario.run(ctx)
    assert _caused_by_injection(info.value), info.value
    assert seen.count(point) == occurrence
    reliability.rows(_recover(ctx, name))
    reliability.fault(f"raise at {name}")


@pytest.mark.parametrize("name, point, occurrence", CASES)
def test_exit_at_fault_point(ctx: CrashContext, name: str, point: str, occurrence: int, reliability: Any) -> None:
    """os._exit at the point, in a subprocess: no rollback, no cleanup."""
    scenario = SCENARIOS[name]
    scenario.prepare(ctx)
    done = run_worker("--url", ctx.url, "--keyfile", ctx.keyfile, "scenario", name, point, str(occurrence))
    assert done.returncode == CRASH_EXIT, done.stderr
    reliability.rows(_recover(ctx, name))
    reliability.crash(f"exit at {name}")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sigkill_during_job(ctx: CrashContext, name: str, reliability: Any) -> None:
    """A real SIGKILL at a randomly chosen fault point of the job (the worker
    waits there until killed), then recovery from whatever state that left."""
    scenario = SCENARIOS[name]
    scenario.prepare(ctx)
    target = random.randrange(len(scenario.points) * scenario.occurrences)
    passed: list[str] = []

    def stop(line: str) -> bool:
        passed.append(line)
        return len(passed) > target

    proc = start_worker("--url", ctx.url, "--keyfile", ctx.keyfile, "job", name)
    killed = kill_after(proc, stop, resume=True)
    assert killed is not None and killed.startswith("point "), (passed, proc.stderr.read() if proc.stderr else "")
    checked = scenario.verify(ctx, None)
    scenario.run(ctx)
    reliability.rows(checked + scenario.verify(ctx, False))
    reliability.crash(f"SIGKILL during {name}")


def _bulk(ctx: CrashContext, start: int, stop: int) -> subprocess.Popen[str]:
    return start_worker("--url", ctx.url, "--keyfile", ctx.keyfile, "bulk", str(start), str(stop), str(BATCH))


def test_sigkill_during_bulk_insert(ctx: CrashContext, reliability: Any) -> None:
    """Kill -9 mid-batch; every batch reported committed is there and decrypts,
    no batch is half there, and a restarted job finishes the count."""
    ctx.schema().create()
    proc = _bulk(ctx, 0, BULK_ROWS)
    line = kill_after(proc, lambda line: int(line.split()[1]) >= 2 * BATCH)
    assert line is not None and proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    reported = int(line.split()[1])
    stored = count_rows(ctx.engine, "patients")
    assert reported <= stored <= BULK_ROWS and stored % BATCH == 0  # whole batches only
    assert orphan_values(ctx.engine, ctx.tables) == 0
    checked, lost = check_rows(ctx.engine, ctx.provider, "patients", range(stored))
    assert lost == 0
    resumed = _bulk(ctx, stored, BULK_ROWS)
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read() if resumed.stderr else ""
    assert check_rows(ctx.engine, ctx.provider, "patients", range(BULK_ROWS)) == (BULK_ROWS, 0)
    reliability.crash("SIGKILL during bulk insert")
    reliability.rows(checked + BULK_ROWS, lost)
