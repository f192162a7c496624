"""Crash scenario of the orphan sweep (issue 12): shredding keys of rows gone.

Registered when imported; ``reliability/scenarios.py`` imports this module. Rows
deleted by raw SQL leave their (bound) row keys live; the sweep shreds them
in batches of one key, so a crash leaves some shredded and some not, and a
rerun finishes. Rows that still exist are never touched.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from support.models import row_scope_model
from sa_envelope import KeyManager

from .crash import CrashContext, CrashScenario, register

__all__ = ["SWEEP"]

TABLE = "sweep_patients"
ROWS = range(0, 12)
GONE = range(0, 12, 3)  # deleted by raw SQL: their keys are the orphans


def _model(ctx: CrashContext) -> tuple[KeyManager, Any]:
    keys = KeyManager(ctx.engine, ctx.provider)
    return keys, row_scope_model(keys, TABLE)


def _value(n: int) -> dict[str, Any]:
    return {"id": n, "name": f"name {n}", "notes": {"n": n}, "ssn": f"{n:03d}-00"}


def _prepare(ctx: CrashContext) -> None:
    keys, Patient = _model(ctx)
    keys.create_table()
    Patient.metadata.create_all(ctx.engine)
    with Session(ctx.engine) as s:
        s.add_all([Patient(**_value(n)) for n in ROWS])
        s.commit()
    with ctx.engine.begin() as conn:
        conn.execute(text(f"DELETE FROM {TABLE} WHERE id IN ({', '.join(str(n) for n in GONE)})"))


def _run(ctx: CrashContext) -> None:
    keys, _ = _model(ctx)
    keys.sweep_orphans(dry_run=False, batch_size=1, progress=False)


def _live_orphans(ctx: CrashContext) -> int:
    keys, _ = _model(ctx)
    return keys.sweep_orphans(dry_run=True).found


def _verify(ctx: CrashContext, crashed: bool | None) -> int:
    left = _live_orphans(ctx)
    if crashed is False:  # the job ran to its end
        assert left == 0
    elif crashed:  # batches of one key: the crash stopped it before the last one
        assert 0 < left <= len(GONE)
    _, Patient = _model(ctx)
    with Session(ctx.engine) as s:  # every remaining row still reads
        rows = {p.id: (p.name, p.notes, p.ssn) for p in s.scalars(select(Patient))}
    kept = [n for n in ROWS if n not in GONE]
    assert rows == {n: (f"name {n}", {"n": n}, f"{n:03d}-00") for n in kept}
    return len(kept)


SWEEP = register(
    CrashScenario(
        name="sweep",
        points=("sweep.batch.before_commit", "sweep.batch.after_commit"),
        prepare=_prepare,
        run=_run,
        verify=_verify,
    )
)
