"""Crash scenarios of row scope (issue 3): row-key creation and shredding.

Registered when imported; ``reliability/scenarios.py`` imports this module.
The model is ``support.models.row_scope_model`` (table ``shred_patients`` here, so it
never meets the other scenarios' ``patients``): one table-scoped column, two
row-scoped ones.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from sa_envelope import KeyManager
from support.models import row_scope_model
from support.row_scope import row_key_ids

from .crash import CrashContext, CrashScenario, register
from .rows import count_key_rows

__all__ = ["ROWKEY_CREATE", "SHRED"]

TABLE = "shred_patients"
BEFORE = range(0, 20)  # committed before the job
DURING = range(20, 40)  # the rows the job adds (one row key each, one COPY/executemany)
SHREDDED = 3  # the row the shred job erases


def _keys_and_model(ctx: CrashContext) -> tuple[KeyManager, Any]:
    keys = KeyManager(ctx.engine, ctx.provider)  # a cold cache, as after a restart
    return keys, row_scope_model(keys, TABLE)


def _value(n: int) -> dict[str, Any]:
    return {"id": n, "name": f"name {n}", "notes": {"n": n, "é": "x" * (n % 4)}, "ssn": f"{n:03d}-00"}


def _prepare(ctx: CrashContext) -> None:
    keys, Patient = _keys_and_model(ctx)
    keys.create_table()
    Patient.metadata.create_all(ctx.engine)
    with Session(ctx.engine) as s:
        s.add_all([Patient(**_value(n)) for n in BEFORE])
        s.commit()


def _read_rows(ctx: CrashContext) -> dict[int, tuple[Any, ...]]:
    """Every row as a new process reads it (KeyNotFoundError would propagate)."""
    _, Patient = _keys_and_model(ctx)
    with Session(ctx.engine) as s:
        return {p.id: (p.name, p.notes, p.ssn) for p in s.scalars(select(Patient))}


def _expected(n: int) -> tuple[Any, ...]:
    v = _value(n)
    return v["name"], v["notes"], v["ssn"]


def _no_orphans(ctx: CrashContext) -> None:
    """Every stored row-scoped value names a key the key table holds."""
    _, Patient = _keys_and_model(ctx)
    with ctx.engine.connect() as conn:
        stored = {int(k) for k in conn.execute(text("SELECT id FROM sa_envelope_keys")).scalars()}
        named = {k for pair in row_key_ids(conn, Patient).values() for k in pair if k is not None}
    assert named <= stored


# -- row-key creation: new rows and their keys commit or vanish together -----------


def _run_create(ctx: CrashContext) -> None:
    _, Patient = _keys_and_model(ctx)
    with Session(ctx.engine) as s:
        s.add_all([Patient(**_value(n)) for n in DURING])
        s.commit()


def _verify_create(ctx: CrashContext, crashed: bool | None) -> int:
    _no_orphans(ctx)
    rows = _read_rows(ctx)
    if crashed is None:  # killed at a random moment: one transaction, all or nothing
        crashed = len(rows) == len(BEFORE)
    ns = BEFORE if crashed else range(BEFORE.start, DURING.stop)
    assert rows == {n: _expected(n) for n in ns}
    assert count_key_rows(ctx.engine, TABLE, "row") == len(ns)  # no key left behind by the lost rows
    return len(ns)


ROWKEY_CREATE = register(
    CrashScenario(
        name="rowkey.create",
        points=("rowkey.create.before_insert", "rowkey.create.after_insert"),
        prepare=_prepare,
        run=_run_create,
        verify=_verify_create,
    )
)


# -- shredding: erased on commit, untouched otherwise, never "lost" ----------------


def _run_shred(ctx: CrashContext) -> None:
    keys, Patient = _keys_and_model(ctx)
    with Session(ctx.engine) as s:
        keys.shred(s.get(Patient, SHREDDED))
        s.commit()


def _verify_shred(ctx: CrashContext, crashed: bool | None) -> int:
    _no_orphans(ctx)
    rows = _read_rows(ctx)  # a missing key would raise: shredding never looks like loss
    if crashed is None:
        crashed = rows[SHREDDED][1] is not None
    want = {n: _expected(n) for n in BEFORE}
    if not crashed:
        want[SHREDDED] = (want[SHREDDED][0], None, None)
    assert rows == want
    assert count_key_rows(ctx.engine, TABLE, "row") == len(BEFORE)  # the tombstone stays
    return len(BEFORE)


SHRED = register(
    CrashScenario(
        name="shred",
        points=("shred.before_update", "shred.after_update"),
        prepare=_prepare,
        run=_run_shred,
        verify=_verify_shred,
    )
)
