"""Models and helpers shared by the row-scope and shredding tests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Connection, Engine, MetaData, String, select, text, type_coerce
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import LargeBinary

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt

__all__ = ["LOCAL", "count", "key_rows", "make_model", "row_key_ids", "setup"]

LOCAL = LocalKeyProvider(b"\x07" * 32)


def make_model(keys: KeyManager, table: str = "patients") -> Any:
    """A fresh mapped class on ``table``: one table-scoped column and two
    row-scoped ones, bound to ``keys`` (a new manager = a new process)."""

    class Base(DeclarativeBase):
        metadata = MetaData()

    class Patient(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))
        ssn: Mapped[str | None] = mapped_column(EncryptedType(String(11), keys, scope="row"))

    return Patient


def setup(engine: Engine, provider: Any = LOCAL) -> tuple[KeyManager, Any]:
    """A manager, its key table and the ``patients`` table."""
    keys = KeyManager(engine, provider)
    keys.create_table()
    Patient = make_model(keys)
    Patient.metadata.create_all(engine)
    return keys, Patient


def key_rows(conn: Connection, keys: KeyManager) -> list[tuple[Any, ...]]:
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


def count(conn: Connection, sql: str) -> int:
    return int(conn.execute(text(sql)).scalar_one())
