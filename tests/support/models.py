"""The models the tests declare, in one place.

:func:`new_base` is the suite's one declarative base: each call makes a base
with its own registry and MetaData, so the classes of one factory call (a
new KeyManager, as in a new process) never meet those of another. The
factories below are the ones several test modules share; a model that only
one module uses is declared there, on ``new_base()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, Text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, registry

from sa_envelope import EncryptedType, KeyManager

__all__ = [
    "ENCRYPTED_COLUMNS",
    "Schema",
    "data_tables",
    "new_base",
    "patients_model",
    "row_scope_model",
    "schema",
]


def new_base() -> Any:
    """A fresh declarative base (its own registry and MetaData)."""

    class Base(DeclarativeBase):
        pass

    return Base


# -- declarative models ------------------------------------------------------------------


def patients_model(**columns: Any) -> Any:
    """An ORM class for ``patients``: an integer ``id`` and the given column types."""
    attrs = {"__tablename__": "patients", "id": mapped_column(Integer, primary_key=True)}
    attrs.update({name: mapped_column(type_) for name, type_ in columns.items()})
    return type("Patient", (new_base(),), attrs)


def row_scope_model(keys: KeyManager, table: str = "patients") -> Any:
    """A fresh mapped class on ``table``: one table-scoped column and two
    row-scoped ones, bound to ``keys`` (a new manager = a new process)."""

    class Patient(new_base()):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))
        ssn: Mapped[str | None] = mapped_column(EncryptedType(String(11), keys, scope="row"))

    return Patient


# -- Core tables ---------------------------------------------------------------------------


def data_tables(keys: KeyManager, count: int) -> list[Table]:
    """``count`` tables, each with a randomised and a deterministic encrypted column."""
    meta = MetaData()
    return [
        Table(
            f"data_{i}", meta,
            Column("id", Integer, primary_key=True, autoincrement=False),
            Column("name", EncryptedType(String(100), keys)),
            Column("ssn", EncryptedType(String(11), keys, deterministic=True)),
        )
        for i in range(count)
    ]


# -- the reliability tests' table shape (rows: reliability/rows.py) --------------------------

ENCRYPTED_COLUMNS = ("name", "ssn", "note")


def _table(metadata: MetaData, name: str, keys: KeyManager | None) -> Table:
    return Table(
        name,
        metadata,
        Column("id", Integer, primary_key=True),
        Column("n", Integer, nullable=False, index=True),  # plain: what the row should hold
        Column("name", EncryptedType(String(200), keys)),
        Column("ssn", EncryptedType(String(11), keys, deterministic=True)),
        Column("note", EncryptedType(Text, keys)),
    )


@dataclass
class Schema:
    """A KeyManager, its tables and an ORM class per table."""

    keys: KeyManager
    metadata: MetaData
    tables: dict[str, Table]
    models: dict[str, type]

    def create(self) -> None:
        self.keys.create_table()
        self.metadata.create_all(self.keys.engine)


def schema(engine: Engine, provider: Any, names: Iterable[str] = ("patients",), **kw: Any) -> Schema:
    """Tables ``names`` encrypted by a new KeyManager on ``engine``."""
    keys = KeyManager(engine, provider, **kw)
    metadata = MetaData()
    reg = registry(metadata=metadata)
    tables, models = {}, {}
    for name in names:
        tables[name] = _table(metadata, name, keys)
        models[name] = type(f"Row_{name}", (), {})
        reg.map_imperatively(models[name], tables[name])
    return Schema(keys, metadata, tables, models)
