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
from typing import Any

import pytest
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import Engine

from reliability.rows import insert_rows
from reliability.tamper import (
    BYTE_MUTATIONS,
    Cell,
    KeyChanges,
    World,
    draw_source,
    mutate_bytes,
    outcome,
    relabel,
    run_property,
    wrapped_mutations,
)
from sa_envelope import DecryptionError, EnvelopeError, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from support.models import ENCRYPTED_COLUMNS, schema

pytestmark = pytest.mark.reliability

TABLES = ("patients", "visits")
ROWS = range(6)
VALUE_EXAMPLES = 120
KEY_EXAMPLES = 40


@pytest.fixture
def world(engine: Engine) -> World:
    s = schema(engine, LocalKeyProvider(os.urandom(32)), TABLES)
    s.create()
    for table in TABLES:
        insert_rows(s, table, ROWS)
    with engine.connect() as conn:
        plain = {(table, r.id): r for table in TABLES for r in conn.execute(select(s.tables[table]))}
    return World.capture(
        engine, s.keys, s.tables, ENCRYPTED_COLUMNS, lambda table, n, column: getattr(plain[table, n], column)
    )


# -- value mutations ------------------------------------------------------------------


def mutate_value(data: st.DataObject, world: World, cell: Cell) -> tuple[str, bytes]:
    """Draw one mutation of ``cell.stored``; return its kind and the new bytes."""
    v = cell.stored
    kind = data.draw(st.sampled_from([*BYTE_MUTATIONS, "key_id", "move"]))
    if kind in BYTE_MUTATIONS:
        return kind, mutate_bytes(data, kind, v)
    if kind == "key_id":
        own = fmt.read_header(v)[1]
        other = st.sampled_from([k for k in world.key_ids() if k != own])
        unknown = st.integers(1, (1 << 63) - 1).filter(lambda k: k not in world.key_ids())
        key_id = data.draw(st.one_of(other, unknown))
        return ("swapped key id" if key_id in world.key_ids() else "unknown key id"), relabel(v, key_id)
    source = draw_source(data, cell, world.cells)
    same_column = (source.table, source.column) == (cell.table, cell.column)
    return ("moved within a column" if same_column else "moved across columns/tables"), source.stored


def test_tampered_values_fail_closed(world: World, reliability: Any) -> None:
    def example(data: st.DataObject) -> str:
        cell = data.draw(st.sampled_from(world.cells))
        kind, value = mutate_value(data, world, cell)
        if data.draw(st.booleans()):
            world.keys.clear_cache()  # the cold path too: keys read from the table
        world.write(cell, value)
        try:
            outcome = _read(world, cell)
        finally:
            world.write(cell, cell.stored)
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


def mutate_key(data: st.DataObject, world: World, key: dict[str, Any]) -> tuple[str, KeyChanges]:
    """Draw one mutation of a key row; return its kind and the change to apply."""
    wrapped = key["wrapped_key"]
    others = [k for k in world.key_ids() if k != key["id"]]
    options: dict[str, Any] = {
        **wrapped_mutations(data, wrapped),
        "wrapped swapped": lambda: {"wrapped_key": next(k["wrapped_key"] for k in world.key_rows if k["id"] != key["id"])},
        "parent changed": lambda: {"parent_id": data.draw(st.sampled_from(others) | st.integers(1, (1 << 63) - 1))},
        "owner changed": lambda: {"owner_table": data.draw(st.sampled_from([t for t in TABLES if t != key["owner_table"]] + ["other"]))},
        "wrapping key changed": lambda: {"wrapping_key_id": "local:0000000000000000"},
        "algorithm changed": lambda: {"algorithm": data.draw(st.sampled_from(["AES-256-GCM", "AES-256-SIV", "ROT13"]).filter(lambda a: a != key["algorithm"]))},
        "row deleted": None,
    }
    kind = data.draw(st.sampled_from(sorted(options)))
    if options[kind] is None:
        return kind, {key["id"]: None}
    return kind, {key["id"]: options[kind]()}


def test_tampered_key_rows_fail_closed(world: World, reliability: Any) -> None:
    def example(data: st.DataObject) -> str:
        key = data.draw(st.sampled_from(world.key_rows))
        kind, changes = mutate_key(data, world, key)
        world.change_keys(changes)
        world.keys.clear_cache()
        try:
            for cell in world.cells:
                if fmt.read_header(cell.stored)[1] == key["id"]:
                    outcome = _read_any(world, cell)
                    assert outcome in (cell.plaintext, EnvelopeError), (kind, outcome)
        finally:
            world.restore_keys(changes)
        return kind

    run_property(KEY_EXAMPLES, example, reliability, "key row")
    world.keys.clear_cache()
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
