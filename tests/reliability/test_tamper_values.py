"""Tampering: property-based mutations of stored values and of key rows.

A fixed database (two tables, a few rows each) is written once per backend;
hypothesis then mutates one stored value or one key row through raw SQL
UPDATEs, reads through the package, and restores the original bytes.

The property: every read either returns the value's own plaintext or raises
one of the package's errors (``EnvelopeError`` subclasses). Never another
exception, never another value's plaintext, with one documented exception:
a value copied to another *row of the same column* decrypts to what it said
(table-scoped values are bound to table and column, not to the row; see
docs/threat-model.md). Those cases are counted apart as "moved within a
column".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import strategies as st
from sqlalchemy import delete, select, text
from sqlalchemy.engine import Connection, Engine

from reliability.rows import insert_rows
from reliability.tamper import BYTE_MUTATIONS, StoredCell, flip, mutate_bytes, outcome, run_property, write_raw
from sa_envelope import DecryptionError, EnvelopeError, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from support.models import ENCRYPTED_COLUMNS, Schema, schema

pytestmark = pytest.mark.reliability

TABLES = ("patients", "visits")
ROWS = range(6)
VALUE_EXAMPLES = 120
KEY_EXAMPLES = 40


@dataclass(frozen=True)
class Cell(StoredCell):
    plaintext: Any


@dataclass
class World:
    """The fixed database and how to read one cell through the package."""

    engine: Engine
    s: Schema
    cells: list[Cell]
    keys: list[dict[str, Any]]  # the key table's rows, as written

    def read(self, cell: Cell) -> Any:
        t = self.s.tables[cell.table]
        with self.engine.connect() as conn:
            return conn.execute(select(t.c[cell.column]).where(t.c.id == cell.id)).scalar_one()

    def write_raw(self, cell: Cell, value: bytes) -> None:
        write_raw(self.engine, cell.table, cell.column, cell.id, value)

    def restore_key(self, conn: Connection, key_id: int) -> None:
        table = self.s.keys.table
        conn.execute(delete(table).where(table.c.id == key_id))
        conn.execute(table.insert(), [k for k in self.keys if k["id"] == key_id])


@pytest.fixture
def world(engine: Engine) -> World:
    s = schema(engine, LocalKeyProvider(os.urandom(32)), TABLES)
    s.create()
    for table in TABLES:
        insert_rows(s, table, ROWS)
    cells = []
    with engine.connect() as conn:
        for table in TABLES:
            t = s.tables[table]
            raw = conn.execute(text(f"SELECT id, {', '.join(ENCRYPTED_COLUMNS)} FROM {table}")).all()
            plain = {r.id: r for r in conn.execute(select(t))}
            for row in raw:
                for i, column in enumerate(ENCRYPTED_COLUMNS):
                    cells.append(Cell(table, row.id, column, bytes(row[i + 1]), getattr(plain[row.id], column)))
        keys = [dict(r._mapping) for r in conn.execute(select(s.keys.table))]
    return World(engine, s, cells, keys)


# -- value mutations ------------------------------------------------------------------


def _key_ids(world: World) -> list[int]:
    return [k["id"] for k in world.keys]


def mutate_value(data: st.DataObject, world: World, cell: Cell) -> tuple[str, bytes]:
    """Draw one mutation of ``cell.stored``; return its kind and the new bytes."""
    v = cell.stored
    kind = data.draw(st.sampled_from([*BYTE_MUTATIONS, "key_id", "move"]))
    if kind in BYTE_MUTATIONS:
        return kind, mutate_bytes(data, kind, v)
    if kind == "key_id":
        own = fmt.read_header(v)[1]
        other = st.sampled_from([k for k in _key_ids(world) if k != own])
        unknown = st.integers(1, (1 << 63) - 1).filter(lambda k: k not in _key_ids(world))
        key_id = data.draw(st.one_of(other, unknown))
        return ("swapped key id" if key_id in _key_ids(world) else "unknown key id"), v[:1] + key_id.to_bytes(8, "big") + v[9:]
    source = data.draw(st.sampled_from([c for c in world.cells if c != cell and c.stored != v]))
    same_column = (source.table, source.column) == (cell.table, cell.column)
    return ("moved within a column" if same_column else "moved across columns/tables"), source.stored


def test_tampered_values_fail_closed(world: World, reliability: Any) -> None:
    def example(data: st.DataObject) -> str:
        cell = data.draw(st.sampled_from(world.cells))
        kind, value = mutate_value(data, world, cell)
        if data.draw(st.booleans()):
            world.s.keys.clear_cache()  # the cold path too: keys read from the table
        world.write_raw(cell, value)
        try:
            outcome = _read(world, cell)
        finally:
            world.write_raw(cell, cell.stored)
        if kind == "moved within a column":
            source = next(c for c in world.cells if c.stored == value)
            assert outcome in (source.plaintext, DecryptionError), (kind, outcome)
        else:
            assert outcome is DecryptionError, (kind, outcome)
        return kind

    run_property(VALUE_EXAMPLES, example, reliability, "value")
    assert all(_read(world, c) == c.plaintext for c in world.cells)  # restored intact


def _read(world: World, cell: Cell) -> Any:
    """The plaintext, or the class DecryptionError if one of ours was raised
    (anything else propagates and fails the property)."""
    return outcome(lambda: world.read(cell), DecryptionError)


# -- key-row mutations ------------------------------------------------------------------


def mutate_key(data: st.DataObject, world: World, key: dict[str, Any]) -> tuple[str, Callable[[Connection], None]]:
    """Draw one mutation of a key row; return its kind and how to apply it."""
    table = world.s.keys.table
    where = table.c.id == key["id"]
    wrapped = key["wrapped_key"]
    others = [k for k in _key_ids(world) if k != key["id"]]
    options: dict[str, Any] = {
        "wrapped flipped": lambda: {"wrapped_key": flip(data, wrapped)},
        "wrapped truncated": lambda: {"wrapped_key": wrapped[: data.draw(st.integers(0, len(wrapped) - 1))]},
        "wrapped extended": lambda: {"wrapped_key": wrapped + data.draw(st.binary(min_size=1, max_size=16))},
        "wrapped swapped": lambda: {"wrapped_key": next(k["wrapped_key"] for k in world.keys if k["id"] != key["id"])},
        "parent changed": lambda: {"parent_id": data.draw(st.sampled_from(others) | st.integers(1, (1 << 63) - 1))},
        "owner changed": lambda: {"owner_table": data.draw(st.sampled_from([t for t in TABLES if t != key["owner_table"]] + ["other"]))},
        "wrapping key changed": lambda: {"wrapping_key_id": "local:0000000000000000"},
        "algorithm changed": lambda: {"algorithm": data.draw(st.sampled_from(["AES-256-GCM", "AES-256-SIV", "ROT13"]).filter(lambda a: a != key["algorithm"]))},
        "row deleted": None,
    }
    kind = data.draw(st.sampled_from(sorted(options)))
    if options[kind] is None:
        return kind, lambda conn: conn.execute(delete(table).where(where))
    values = options[kind]()
    return kind, lambda conn: conn.execute(table.update().where(where).values(**values))


def test_tampered_key_rows_fail_closed(world: World, reliability: Any) -> None:
    def example(data: st.DataObject) -> str:
        key = data.draw(st.sampled_from(world.keys))
        kind, apply = mutate_key(data, world, key)
        with world.engine.begin() as conn:
            apply(conn)
        world.s.keys.clear_cache()
        try:
            for cell in world.cells:
                if fmt.read_header(cell.stored)[1] == key["id"]:
                    outcome = _read_any(world, cell)
                    assert outcome in (cell.plaintext, EnvelopeError), (kind, outcome)
        finally:
            with world.engine.begin() as conn:
                world.restore_key(conn, key["id"])
        return kind

    run_property(KEY_EXAMPLES, example, reliability, "key row")
    world.s.keys.clear_cache()
    assert all(_read(world, c) == c.plaintext for c in world.cells)


def _read_any(world: World, cell: Cell) -> Any:
    """As :func:`_read`, for any of our errors (a bad key row may be the
    provider's refusal, a KeyProviderError, not a DecryptionError)."""
    return outcome(lambda: world.read(cell))


def test_tampered_kms_wrapped_key_is_refused(engine: Engine, kms_client: Any, cmk: str, reliability: Any) -> None:
    """The same through AWS KMS (moto): altered wrapped bytes and a moved
    key row (owner changed: the encryption context no longer matches) are
    refused by KMS, which reaches the caller as our KeyProviderError."""
    from sa_envelope import AwsKmsProvider

    s = schema(engine, AwsKmsProvider(cmk, client=kms_client))
    s.create()
    insert_rows(s, "patients", ROWS)
    table = s.keys.table
    with engine.connect() as conn:
        original = [dict(r._mapping) for r in conn.execute(select(table))]
    tamperings = {
        "wrapped flipped": lambda k: {"wrapped_key": k["wrapped_key"][:-1] + bytes([k["wrapped_key"][-1] ^ 1])},
        "owner changed": lambda k: {"owner_table": "visits"},
    }
    for kind, change in tamperings.items():
        with engine.begin() as conn:
            for k in original:
                conn.execute(table.update().where(table.c.id == k["id"]).values(**change(k)))
        fresh = schema(engine, AwsKmsProvider(cmk, client=kms_client))
        with engine.connect() as conn, pytest.raises(EnvelopeError, match="InvalidCiphertextException"):
            conn.execute(select(fresh.tables["patients"].c.name)).all()
        with engine.begin() as conn:
            for k in original:
                conn.execute(table.update().where(table.c.id == k["id"]).values(**k))
        reliability.bad_input(f"KMS key row {kind}")
    fresh = schema(engine, AwsKmsProvider(cmk, client=kms_client))
    with engine.connect() as conn:
        assert len(conn.execute(select(fresh.tables["patients"].c.name)).all()) == len(ROWS)
