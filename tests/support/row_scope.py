"""Helpers shared by the row-scope and shredding tests (their model: ``support.models.row_scope_model``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, select, text, type_coerce
from sqlalchemy.types import LargeBinary

from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt

from .models import row_scope_model

__all__ = ["LOCAL", "key_table_rows", "keys_and_patients", "row_key_ids", "sql_count"]

LOCAL = LocalKeyProvider(b"\x07" * 32)


def keys_and_patients(engine: Engine, provider: Any = LOCAL) -> tuple[KeyManager, Any]:
    """A manager, its key table and the ``patients`` table."""
    keys = KeyManager(engine, provider)
    keys.create_table()
    Patient = row_scope_model(keys)
    Patient.metadata.create_all(engine)
    return keys, Patient


def key_table_rows(conn: Connection, keys: KeyManager) -> list[tuple[Any, ...]]:
    """The whole key table, comparable across time."""
    t = keys.table
    cols = (t.c.id, t.c.scope, t.c.parent_id, t.c.wrapping_key_id, t.c.wrapped_key, t.c.status)
    return [tuple(r) for r in conn.execute(select(*cols).order_by(t.c.id))]


def row_key_ids(conn: Connection, Patient: Any) -> dict[int, tuple[int | None, int | None]]:
    """patient id -> (key id of ``notes``, key id of ``ssn``) from the stored headers."""
    t = Patient.__table__
    stmt = select(t.c.id, type_coerce(t.c.notes, LargeBinary()), type_coerce(t.c.ssn, LargeBinary()))
    out = {}
    for pid, notes, ssn in conn.execute(stmt):
        out[pid] = tuple(fmt.read_header(bytes(v))[1] if v is not None else None for v in (notes, ssn))
    return out


def sql_count(conn: Connection, sql: str) -> int:
    """What a ``SELECT COUNT(*) ...`` statement returns."""
    return int(conn.execute(text(sql)).scalar_one())
