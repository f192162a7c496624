"""The write- and read-path matrices' model and checks (tests/integration/test_*_paths.py).

One table per manager with one encrypted column per scope (``tbl``: table
scope, ``det``: deterministic, ``row``: row scope), plain values to write,
and the checks every case makes: the stored bytes are envelopes of the
right version under the right kind of key, and the values read back equal
what was written.
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import JSON, Integer, LargeBinary, String, column, select, table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from sa_envelope.rows import binding

from .models import new_base

__all__ = ["ROWS", "assert_bound", "assert_stored", "make_item", "raw_rows", "read_back", "rows_as_dicts", "row_keys_of", "setup"]

ROWS = [
    (1, "Ada Lovelace", "123-45-6789", {"notes": "first", "n": 1}),
    (2, "Alan Turing", "987-65-4321", {"notes": "ünïcødé ✓", "n": 2}),
    (3, "Grace Hopper", "123-45-6789", {"notes": "x" * 5000, "n": 3}),
]
NEW = [
    (1, "Ada King", "111-11-1111", {"notes": "changed", "n": 10}),
    (2, "A. M. Turing", "222-22-2222", {"notes": "changed ✓", "n": 20}),
    (3, "Rear Admiral Hopper", "123-45-6789", {"notes": "y" * 3000, "n": 30}),
]


def make_item(keys: KeyManager, *, autoincrement: bool = False, tablename: str = "items") -> Any:
    """The mapped class ``Item``: ``id``, and ``tbl``, ``det``, ``row``."""

    class Item(new_base()):
        __tablename__ = tablename
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=autoincrement)
        tbl: Mapped[str | None] = mapped_column(EncryptedType(String(100), keys))
        det: Mapped[str | None] = mapped_column(EncryptedType(String(20), keys, deterministic=True))
        row: Mapped[dict[str, Any] | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))

    return Item


def setup(engine: Engine, **kw: Any) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    Item = make_item(keys, **kw)
    Item.metadata.create_all(engine)
    return keys, Item


def rows_as_dicts(rows: list[tuple[Any, ...]] = ROWS, *, with_id: bool = True) -> list[dict[str, Any]]:
    out = [{"id": i, "tbl": t, "det": d, "row": r} for i, t, d, r in rows]
    if not with_id:
        for d in out:
            del d["id"]
    return out


def raw_rows(conn: Connection, name: str = "items") -> dict[int, tuple[Any, ...]]:
    """The stored bytes, read without the column types (a lightweight table)."""
    raw = table(name, column("id"), column("tbl", LargeBinary), column("det", LargeBinary), column("row", LargeBinary))
    return {r[0]: tuple(bytes(v) if v is not None else None for v in r[1:]) for r in conn.execute(select(raw))}


def assert_stored(engine: Engine, keys: KeyManager, expected: list[tuple[Any, ...]], name: str = "items") -> None:
    """Every stored value is an envelope: GCM under a table key (``tbl``), SIV
    under a deterministic key (``det``), GCM under a row key bound to its row
    (``row``: one key per row); and the key ids exist in the key table."""
    kt = keys.table
    with engine.connect() as conn:
        stored = raw_rows(conn, name)
        scopes = dict(conn.execute(select(kt.c.id, kt.c.scope)).all())
    assert sorted(stored) == sorted(e[0] for e in expected)
    row_keys = set()
    for e in expected:
        tbl, det, row = stored[e[0]]
        checks = ((tbl, fmt.VERSION_GCM, "table", e[1]), (det, fmt.VERSION_SIV, "deterministic", e[2]))
        for value, version, scope, plain in (*checks, (row, fmt.VERSION_GCM, "row", e[3])):
            if plain is None:
                assert value is None
                continue
            got_version, key_id = fmt.read_header(value)
            assert (got_version, scopes.get(key_id)) == (version, scope)
            if isinstance(plain, str):
                assert plain.encode("utf-8") not in value
            if scope == "row":
                row_keys.add(key_id)
    assert len(row_keys) == sum(1 for e in expected if e[3] is not None)


def read_back(engine: Engine, Item: Any) -> list[tuple[Any, ...]]:
    """The rows through the ORM (binding checked by the prefetch) and through Core; both must agree."""
    with Session(engine) as s:
        orm = [(i.id, i.tbl, i.det, i.row) for i in s.scalars(select(Item).order_by(Item.id))]
    with engine.connect() as conn:
        t = Item.__table__
        core = [tuple(r) for r in conn.execute(select(t.c.id, t.c.tbl, t.c.det, t.c.row).order_by(t.c.id))]
    assert orm == core
    return orm


def row_keys_of(conn: Connection, name: str = "items", name_of: str = "row") -> dict[Any, int]:
    """primary key ``id`` -> the key id the stored row-scoped value names (rows with a value)."""
    raw = table(name, column("id"), column(name_of, LargeBinary))
    return {r[0]: fmt.read_header(bytes(r[1]))[1] for r in conn.execute(select(raw)) if r[1] is not None}


def assert_bound(engine: Engine, keys: KeyManager, name: str = "items", name_of: str = "row") -> dict[Any, int]:
    """Every stored row-scoped value is under a live row key stored in the key
    table and bound to that very row (its digest of the row's primary key),
    one key per row; returns primary key -> key id."""
    kt = keys.table
    with engine.connect() as conn:
        named = row_keys_of(conn, name, name_of)
        stored = {r.id: r for r in conn.execute(select(kt.c.id, kt.c.scope, kt.c.status, kt.c.row_digest))}
        rows = keys.rows_for(conn)
        dkey = binding.digest_key(rows, conn, name, create=False)
    assert len(set(named.values())) == len(named)
    for pk, key_id in named.items():
        record = stored.get(key_id)
        assert record is not None, f"row {pk}: its key is not in the key table"
        assert (record.scope, record.status) == ("row", "active")
        digest = None if record.row_digest is None else bytes(record.row_digest)
        assert dkey is not None and digest == binding.row_digest(dkey, (pk,)), f"row {pk}: its key is not bound to it"
    return named
