"""The rows of the reliability tests' table shape (``support.models.schema``).

Every row's plaintext is a pure function of its number ``n`` (:func:`expected`),
so a test, or a fresh process after a crash, can check any committed row
without remembering what was written. :func:`check_rows` reads rows back
through a *fresh* KeyManager (cold cache, keys read from the key table) and
reports how many were checked and how many were lost or wrong.
"""

from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from support.models import ENCRYPTED_COLUMNS, Schema, schema

__all__ = ["add_rows", "check_rows", "count_key_rows", "count_rows", "expected", "insert_rows"]

def expected(n: int) -> dict[str, Any]:
    """The plaintext of row ``n`` (non-ASCII on purpose)."""
    return {"name": f"patient {n} é", "ssn": f"{n % 1000:03d}-00-{n:04d}"[:11], "note": f"note {n} " * (n % 5)}


def add_rows(s: Schema, session: Session, table: str, ns: Iterable[int]) -> None:
    """ORM ``add_all`` of rows ``ns`` (the caller commits)."""
    model = s.models[table]
    objs = []
    for n in ns:
        obj = model()
        obj.n = n
        for column, value in expected(n).items():
            setattr(obj, column, value)
        objs.append(obj)
    session.add_all(objs)


def insert_rows(s: Schema, table: str, ns: Iterable[int], session: Session | None = None) -> None:
    """Add rows ``ns`` and commit, in ``session`` if given, else in a new one."""
    if session is not None:
        add_rows(s, session, table, ns)
        session.commit()
        return
    with Session(s.keys.engine) as own:
        add_rows(s, own, table, ns)
        own.commit()


def count_rows(engine: Engine, table: str) -> int:
    """Rows in ``table`` as a plain SQL count (nothing decrypted)."""
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())


def count_key_rows(engine: Engine, owner: str | None = None, scope: str | None = None) -> int:
    """Rows in the key table, optionally for one owner table and scope."""
    sql = "SELECT COUNT(*) FROM sa_envelope_keys WHERE 1 = 1"
    params: dict[str, str] = {}
    if owner is not None:
        sql += " AND owner_table = :owner"
        params["owner"] = owner
    if scope is not None:
        sql += " AND scope = :scope"
        params["scope"] = scope
    with engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def check_rows(engine: Engine, provider: Any, table: str, ns: Iterable[int] | None = None) -> tuple[int, int]:
    """Read ``table`` through a fresh KeyManager; return ``(checked, lost)``.

    ``ns`` are the row numbers that must be there (each exactly once); rows
    that are missing, duplicated or decrypt to anything but :func:`expected`
    count as lost. Without ``ns`` every stored row is checked for its value.
    """
    fresh = schema(engine, provider, [table])
    t = fresh.tables[table]
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.n, *(t.c[c] for c in ENCRYPTED_COLUMNS))).all()
    seen: dict[int, int] = {}
    wrong = 0
    for row in rows:
        seen[row.n] = seen.get(row.n, 0) + 1
        if {c: getattr(row, c) for c in ENCRYPTED_COLUMNS} != expected(row.n):
            wrong += 1
    if ns is None:
        return len(rows), wrong
    want = set(ns)
    missing = len(want - set(seen))
    extra = sum(v - 1 for v in seen.values()) + len(set(seen) - want)
    return len(want), missing + wrong + extra
