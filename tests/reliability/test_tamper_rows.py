"""Tampering with row-scoped values and row keys (issue 7, row scope).

A fixed database per backend: two tables (``support.models.row_scope_model``: one
table-scoped column, two row-scoped ones), a few rows each, one row
shredded. Hypothesis mutates one stored row-scoped value, or one key row
(table keys, row keys and the tombstone), with raw SQL, reads every
affected value through the package on a cold cache, and restores.

The property: each read gives the value's own plaintext or one of the
package's errors (``EnvelopeError``), never another exception and never
another row's plaintext, except where docs/threat-model.md ("Row-scoped
values") documents otherwise:

- a value copied into another *row of the same column* decrypts to what it
  said (its source row's value, or ``None`` if that row was shredded);
- a value whose key is a tombstone reads as ``None``: a value relabelled to
  name the shredded key, and a key made a tombstone by hand (status
  ``shredded``, or its wrapped bytes erased).

Those cases are counted apart in the figures.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

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
from sa_envelope import DecryptionError, EnvelopeError, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support.models import row_scope_model

pytestmark = pytest.mark.reliability

TABLES = ("patients", "visits")
ROWS = range(4)
SHREDDED = ("patients", 3)
COLUMNS = ("name", "notes", "ssn")  # name: table scope; notes, ssn: row scope
ROW_COLUMNS = ("notes", "ssn")
VALUE_EXAMPLES = 150
KEY_EXAMPLES = 100
TOMBSTONE_KINDS = ("status shredded by hand", "wrapped key erased")


def _value(table: str, n: int) -> dict[str, Any]:
    return {"id": n, "name": f"{table} {n}", "notes": {"n": n, "t": table, "é": "x" * n}, "ssn": f"{n:03d}-{table[:2]}"}


@pytest.fixture
def world(engine: Engine) -> World:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    models = {t: row_scope_model(keys, t) for t in TABLES}
    for model in models.values():
        model.metadata.create_all(engine)
    with Session(engine) as session:
        for table, model in models.items():
            session.add_all(model(**_value(table, n)) for n in ROWS)
        session.commit()
        keys.shred(session.get(models[SHREDDED[0]], SHREDDED[1]))
        session.commit()
    # keys of the other scopes, so that tampered rows can name them as parents
    keys.encryption_key("patients", kt.SCOPE_DETERMINISTIC)
    keys.encryption_key("visits", kt.SCOPE_BLIND_INDEX)

    def plaintext(table: str, n: int, column: str) -> Any:
        shredded = (table, n) == SHREDDED
        return None if shredded and column in ROW_COLUMNS else _value(table, n)[column]

    tables = {t: m.__table__ for t, m in models.items()}
    return World.capture(engine, keys, tables, COLUMNS, plaintext, models)


# -- row-scoped values ------------------------------------------------------------------


def mutate_value(data: st.DataObject, world: World, cell: Cell) -> tuple[str, bytes, tuple[Any, ...]]:
    """Draw one mutation of a row-scoped value: its kind, the new bytes and
    the outcomes allowed (``DecryptionError`` unless documented otherwise)."""
    v = cell.stored
    kind = data.draw(st.sampled_from([*BYTE_MUTATIONS, "key id", "move"]))
    if kind in BYTE_MUTATIONS:
        return kind, mutate_bytes(data, kind, v), (DecryptionError,)
    if kind == "key id":
        return _draw_relabel(data, world, cell)
    source = draw_source(data, cell, world.cells)
    if (source.table, source.column) == (cell.table, cell.column):
        return "moved within a column", source.stored, (source.plaintext,)  # the documented limit
    return "moved across columns/tables", source.stored, (DecryptionError,)


def _draw_relabel(data: st.DataObject, world: World, cell: Cell) -> tuple[str, bytes, tuple[Any, ...]]:
    """The value's header made to name another key: another row's key (this
    table or another), a table key, the tombstone, or no stored key."""
    others = {
        "another row's key": [k for k in world.key_ids("row", cell.table) if k not in (cell.key_id, world.tombstone)],
        "another table's row key": [k for k in world.key_ids("row") if world.key(k)["owner_table"] != cell.table],
        "another scope's key": [k for k in world.key_ids() if world.key(k)["scope"] != "row"],
        "the shredded key": [world.tombstone],
    }
    choice = data.draw(st.sampled_from(sorted(others) + ["an unknown key"]))
    candidates = [k for k in others.get(choice, ()) if k != cell.key_id]
    if not candidates:  # an unknown key, or the shredded row's own key (no change): any id not stored
        choice = "an unknown key"
        key_id = data.draw(st.integers(0, (1 << 64) - 1).filter(lambda k: k not in world.key_ids()))
    else:
        key_id = data.draw(st.sampled_from(candidates))
    return f"key id of {choice}", relabel(cell.stored, key_id), (DecryptionError,)


def _names(value: bytes, key_id: int) -> bool:
    """Whether ``value`` has a valid header naming ``key_id``."""
    try:
        return fmt.read_header(value)[1] == key_id
    except fmt.InvalidEnvelope:
        return False


def test_tampered_row_values_fail_closed(world: World, reliability: Any) -> None:
    def example(data: st.DataObject) -> str:
        cell = data.draw(st.sampled_from(world.cells_of(*ROW_COLUMNS)))
        kind, value, allowed = mutate_value(data, world, cell)
        if _names(value, world.tombstone):  # documented: a shredded key opens nothing, reads None
            allowed = (None,)
        if data.draw(st.booleans()):
            world.keys.clear_cache()  # the cold path too: keys (and prefetch) from the key table
        world.write(cell, value)
        try:
            got = outcome(lambda: world.read(cell), DecryptionError)
        finally:
            world.write(cell, cell.stored)
        assert got in allowed, (kind, cell, got)
        return kind

    run_property(VALUE_EXAMPLES, example, reliability, "row value")
    world.keys.clear_cache()
    assert all(world.read(c) == c.plaintext for c in world.cells)  # restored intact


# -- key rows: table keys, row keys, the tombstone -----------------------------------------


def mutate_key(data: st.DataObject, world: World, key: dict[str, Any]) -> tuple[str, KeyChanges]:
    """Draw one mutation of a key row; return its kind and the change to
    apply (to two key rows for a parent cycle)."""
    key_id, wrapped = key["id"], key["wrapped_key"]
    others = [k for k in world.key_ids() if k != key_id]
    options: dict[str, Callable[[], dict[str, Any]]] = {
        "parent changed": lambda: {"parent_id": data.draw(
            st.sampled_from([*others, key_id, None]) | st.integers(1, (1 << 63) - 1)
        )},
        "owner changed": lambda: {"owner_table": data.draw(
            st.sampled_from([t for t in TABLES if t != key["owner_table"]] + ["other"])
        )},
        "scope changed": lambda: {"scope": data.draw(
            st.sampled_from(["table", "row", "deterministic", "blind-index"]).filter(lambda s: s != key["scope"])
        )},
        "wrapping key changed": lambda: {"wrapping_key_id": data.draw(
            st.sampled_from(["local:0000000000000000", "parent"]).filter(lambda w: w != key["wrapping_key_id"])
        )},
        "algorithm changed": lambda: {"algorithm": data.draw(
            st.sampled_from(["AES-256-GCM", "AES-256-SIV", "HMAC-SHA256", "ROT13"]).filter(lambda a: a != key["algorithm"])
        )},
        "status shredded by hand": lambda: {"status": "shredded"},
        "status retired": lambda: {"status": "retired"},
        "status active": lambda: {"status": "active"},
        "wrapped key erased": lambda: {"wrapped_key": None},
        "wrapped swapped": lambda: {"wrapped_key": data.draw(
            st.sampled_from([k["wrapped_key"] for k in world.key_rows if k["wrapped_key"] not in (None, wrapped)])
        )},
    }
    if wrapped is not None:
        options.update(wrapped_mutations(data, wrapped))
    kind = data.draw(st.sampled_from(sorted([*options, "row deleted", "parent cycle"])))
    if kind == "row deleted":
        return kind, {key_id: None}
    if kind == "parent cycle":  # two keys each naming the other as parent
        other = data.draw(st.sampled_from(others))
        return kind, {key_id: {"parent_id": other}, other: {"parent_id": key_id}}
    return kind, {key_id: options[kind]()}


def test_tampered_key_rows_fail_closed(world: World, reliability: Any) -> None:
    def example(data: st.DataObject) -> str:
        key = data.draw(st.sampled_from(world.key_rows))
        kind, changes = mutate_key(data, world, key)
        world.change_keys(changes)
        world.keys.clear_cache()
        try:
            for cell in world.cells:
                got = outcome(lambda: world.read(cell))
                allowed: tuple[Any, ...] = (cell.plaintext, EnvelopeError)
                if kind in TOMBSTONE_KINDS and cell.key_id == key["id"] and cell.column in ROW_COLUMNS:
                    allowed = (None, EnvelopeError)  # made a tombstone by hand: documented
                assert got in allowed, (kind, cell, got)
        finally:
            world.restore_keys(changes)
        return kind

    run_property(KEY_EXAMPLES, example, reliability, "key row (row scope)")
    assert all(world.read(c) == c.plaintext for c in world.cells)


def test_cases_the_properties_found(world: World, reliability: Any) -> None:
    """Regressions the properties above found, pinned so that every run tries
    them: a row key whose parent is another row key, itself, a cycle of two
    (these recursed without end) or a key of another scope; wrapped bytes too
    short for a nonce (a ValueError); a header naming an id beyond BIGINT
    (PostgreSQL refused the prefetch query). Each is DecryptionError."""
    a, b = [c.key_id for c in world.cells_of("notes") if c.table == "visits"][:2]
    victim = next(c for c in world.cells_of("notes") if c.key_id == a)
    siv = world.key_ids("deterministic")[0]
    cases: dict[str, KeyChanges] = {
        "parent chain": {a: {"parent_id": b}},
        "parent self": {a: {"parent_id": a}},
        "parent cycle": {a: {"parent_id": b}, b: {"parent_id": a}},
        "parent of another scope": {a: {"parent_id": siv}},
        "wrapped too short": {a: {"wrapped_key": b"\x01"}},
    }
    for kind, changes in cases.items():
        world.change_keys(changes)
        world.keys.clear_cache()
        with pytest.raises(DecryptionError):
            world.read(victim)
        world.restore_keys(changes)
        reliability.bad_input(f"key row (row scope) {kind}")
    world.write(victim, relabel(victim.stored, (1 << 64) - 1))
    with pytest.raises(DecryptionError):
        world.read(victim)
    world.write(victim, victim.stored)
    reliability.bad_input("row value key id beyond BIGINT")
    assert world.read(victim) == victim.plaintext
