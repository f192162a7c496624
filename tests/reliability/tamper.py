"""Shared machinery of the tampering tests (tests/reliability/test_tamper_*.py).

Each property draws one mutation of stored bytes or of a key row, applies it
with raw SQL, reads through the package, and restores the original. The
database every property works on is a :class:`World`: its tables, every
stored value as written (:class:`Cell`), the key table as written, and how
to read a cell, write raw bytes and put key rows back. The helpers below
draw the mutations, write raw bytes, and tally what was tried into the
reliability figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import LargeBinary, Table, bindparam, delete, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from sa_envelope import EnvelopeError, KeyManager
from sa_envelope.envelope import format as fmt

__all__ = [
    "BYTE_MUTATIONS",
    "Cell",
    "KeyChanges",
    "SETTINGS",
    "World",
    "draw_source",
    "flip",
    "mutate_bytes",
    "outcome",
    "read_raw",
    "relabel",
    "run_property",
    "wrapped_mutations",
    "write_raw",
]

SETTINGS: dict[str, Any] = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

KeyChanges = dict[int, "dict[str, Any] | None"]
"""Key id -> the column values to set in its row, or ``None``: delete the row."""


def flip(data: st.DataObject, b: bytes) -> bytes:
    """``b`` with one drawn bit flipped."""
    i = data.draw(st.integers(0, len(b) - 1))
    return b[:i] + bytes([b[i] ^ (1 << data.draw(st.integers(0, 7)))]) + b[i + 1 :]


@dataclass(frozen=True)
class Cell:
    """One stored encrypted value as written: where it is, its bytes and,
    where the test knows it, the plaintext a read must give."""

    table: str
    id: int
    column: str
    stored: bytes
    plaintext: Any = None

    @property
    def key_id(self) -> int:
        """The key id its header names."""
        return fmt.read_header(self.stored)[1]


BYTE_MUTATIONS = ("flip", "truncate", "extend", "version")


def mutate_bytes(data: st.DataObject, kind: str, v: bytes) -> bytes:
    """One of :data:`BYTE_MUTATIONS` of a stored value ``v``: a bit flipped,
    cut short, bytes appended, or another first (version) byte."""
    if kind == "flip":
        return flip(data, v)
    if kind == "truncate":
        return v[: data.draw(st.integers(0, len(v) - 1))]
    if kind == "extend":
        return v + data.draw(st.binary(min_size=1, max_size=32))
    return bytes([data.draw(st.integers(0, 255).filter(lambda b: b != v[0]))]) + v[1:]


def relabel(v: bytes, key_id: int) -> bytes:
    """The stored value ``v`` with its header edited to name ``key_id``."""
    return v[:1] + key_id.to_bytes(8, "big") + v[9:]


def draw_source(data: st.DataObject, cell: Cell, candidates: Iterable[Cell]) -> Cell:
    """Another cell of ``candidates`` (other bytes) whose value is copied into ``cell``."""
    return data.draw(st.sampled_from([c for c in candidates if c != cell and c.stored != cell.stored]))


def wrapped_mutations(data: st.DataObject, wrapped: bytes) -> dict[str, Callable[[], dict[str, Any]]]:
    """Mutations of a key row's wrapped bytes: a bit flipped, cut short, bytes appended."""
    return {
        "wrapped flipped": lambda: {"wrapped_key": flip(data, wrapped)},
        "wrapped truncated": lambda: {"wrapped_key": wrapped[: data.draw(st.integers(0, len(wrapped) - 1))]},
        "wrapped extended": lambda: {"wrapped_key": wrapped + data.draw(st.binary(min_size=1, max_size=16))},
    }


def write_raw(engine: Engine, table: str, column: str, row_id: int, value: bytes | None) -> None:
    """Store ``value`` as is (no encryption) in one cell, committed."""
    stmt = text(f"UPDATE {table} SET {column} = :v WHERE id = :id").bindparams(bindparam("v", type_=LargeBinary))
    with engine.begin() as conn:
        conn.execute(stmt, {"v": value, "id": row_id})


def read_raw(engine: Engine, table: str, column: str, row_id: int) -> bytes:
    """The bytes stored in one cell (nothing decrypted)."""
    with engine.connect() as conn:
        return bytes(conn.execute(text(f"SELECT {column} FROM {table} WHERE id = :i"), {"i": row_id}).scalar())


@dataclass
class World:
    """A fixed database to tamper with, and how to read one cell through the package."""

    engine: Engine
    keys: KeyManager
    tables: dict[str, Table]  # name -> table, its columns encrypted through ``keys``
    cells: list[Cell]  # the stored values, as written
    key_rows: list[dict[str, Any]]  # the key table, as written
    models: dict[str, Any] = field(default_factory=dict)  # name -> ORM class, where a test needs one

    @classmethod
    def capture(
        cls,
        engine: Engine,
        keys: KeyManager,
        tables: Mapping[str, Table],
        columns: Sequence[str],
        plaintext: Callable[[str, int, str], Any] | None = None,
        models: Mapping[str, Any] | None = None,
    ) -> World:
        """The world as written: every stored value of ``columns`` in ``tables``
        (``plaintext(table, id, column)`` is what it must read as) and every key row."""
        cells = []
        with engine.connect() as conn:
            for table in tables:
                for row in conn.execute(text(f"SELECT id, {', '.join(columns)} FROM {table}")).all():
                    for i, column in enumerate(columns):
                        plain = plaintext(table, row.id, column) if plaintext is not None else None
                        cells.append(Cell(table, row.id, column, bytes(row[i + 1]), plain))
            key_rows = [dict(r._mapping) for r in conn.execute(select(keys.table))]
        return cls(engine, keys, dict(tables), cells, key_rows, dict(models or {}))

    # -- cells -------------------------------------------------------------------------

    def cells_of(self, *columns: str) -> list[Cell]:
        return [c for c in self.cells if c.column in columns]

    def read_at(self, table: str, column: str, row_id: int) -> Any:
        """One value, decrypted by the package."""
        t = self.tables[table]
        with self.engine.connect() as conn:
            return conn.execute(select(t.c[column]).where(t.c.id == row_id)).scalar_one()

    def read(self, cell: Cell) -> Any:
        return self.read_at(cell.table, cell.column, cell.id)

    def write(self, cell: Cell, value: bytes | None) -> None:
        """Store ``value`` as is in ``cell``."""
        write_raw(self.engine, cell.table, cell.column, cell.id, value)

    def try_write(self, cell: Cell, value: bytes | None) -> bool:
        """As :meth:`write`; ``False`` if the database refused the value
        (MariaDB's strict mode rejects bytes longer than a VARBINARY)."""
        try:
            self.write(cell, value)
        except DBAPIError:
            return False
        return True

    # -- key rows ----------------------------------------------------------------------

    def key(self, key_id: int) -> dict[str, Any]:
        """The key row ``key_id`` as written."""
        return next(k for k in self.key_rows if k["id"] == key_id)

    def key_ids(self, scope: str | None = None, owner: str | None = None) -> list[int]:
        """Ids of the key rows as written, optionally of one scope and owner table."""
        return [
            k["id"] for k in self.key_rows
            if (scope is None or k["scope"] == scope) and (owner is None or k["owner_table"] == owner)
        ]

    @property
    def tombstone(self) -> int:
        """The id of the shredded key."""
        return next(k["id"] for k in self.key_rows if k["status"] == "shredded")

    def change_keys(self, changes: KeyChanges) -> None:
        """Apply ``changes`` to the key table in one transaction (the cache keeps what it holds)."""
        table = self.keys.table
        with self.engine.begin() as conn:
            for key_id, values in changes.items():
                where = table.c.id == key_id
                conn.execute(delete(table).where(where) if values is None else table.update().where(where).values(**values))

    def restore_keys(self, key_ids: Iterable[int]) -> None:
        """Put the key rows ``key_ids`` back as written, and empty the cache."""
        ids = set(key_ids)
        table = self.keys.table
        with self.engine.begin() as conn:
            conn.execute(delete(table).where(table.c.id.in_(ids)))
            conn.execute(table.insert(), [k for k in self.key_rows if k["id"] in ids])
        self.keys.clear_cache()


def outcome(read: Callable[[], Any], error: type[EnvelopeError] = EnvelopeError) -> Any:
    """What ``read()`` returned, or the class ``error`` if it raised one of
    ours of that class (anything else propagates and fails the property)."""
    try:
        return read()
    except error:
        return error


def run_property(examples: int, example: Callable[[st.DataObject], str], reliability: Any, prefix: str) -> None:
    """Run ``example`` (which returns the kind of mutation it tried) under
    hypothesis, then add the kinds tried to the reliability figures."""
    tried: Counter[str] = Counter()

    @settings(max_examples=examples, **SETTINGS)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        tried[example(data)] += 1

    check()
    for kind, n in tried.items():
        reliability.bad_input(f"{prefix} {kind}", n)
