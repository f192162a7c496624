"""Key rows written in bulk (``rows.keyrows``): from ``COPY_MIN_ROWS`` rows
a statement's row keys take the driver's fast path (COPY on psycopg, the
multi-row INSERT built with the shared values escaped once on PyMySQL, one
DBAPI executemany elsewhere). Each must store exactly what the plain
SQLAlchemy executemany stores, and the rows written through it must read
back from a fresh process's cache."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.envelope import ciphers
from sa_envelope.envelope.ciphers import RowKeyCipher, current_aead
from sa_envelope.keys import table as kt
from sa_envelope.rows import keyrows
from support.paths import assert_bound, setup

MANY = keyrows.COPY_MIN_ROWS + 50


def _key_rows(n: int, first_id: int) -> list[tuple[Any, ...]]:
    """``VARYING`` tuples: odd rows bound (a digest), even rows not; bytes
    that need escaping (quotes, backslashes, NUL, ``%``) in every wrap."""
    tricky = b"'\\\x00%s%%\"" * 6
    return [
        (first_id + i, 7, tricky + os.urandom(61 - len(tricky)), os.urandom(32) if i % 2 else None) for i in range(n)
    ]


def _stored(engine: Engine, keys: KeyManager, owner: str) -> list[tuple[Any, ...]]:
    t = keys.table
    with engine.connect() as conn:
        rows = conn.execute(select(t).where(t.c.owner_table == owner).order_by(t.c.id)).all()
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]


def test_bulk_key_rows_store_what_the_plain_insert_stores(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    t, now = keys.table, kt.utcnow()
    fast, plain = _key_rows(MANY, 10**12), _key_rows(MANY, 2 * 10**12)
    plain = [(i, p, fast[n][2], fast[n][3]) for n, (i, p, _, _) in enumerate(plain)]  # same bytes, other ids
    with engine.begin() as conn:
        keyrows.insert_key_rows(conn, t, keyrows.shared_values("bulk_fast", now), fast)
        shared = keyrows.shared_values("bulk_plain", now)
        conn.execute(t.insert(), [{**dict(zip(keyrows.VARYING, row)), **shared} for row in plain])
    got_fast, got_plain = _stored(engine, keys, "bulk_fast"), _stored(engine, keys, "bulk_plain")
    owner_at = [c.name for c in t.columns].index("owner_table")

    def comparable(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [r[1:owner_at] + r[owner_at + 1 :] for r in rows]  # all but the id and the owner

    assert len(got_fast) == MANY
    assert comparable(got_fast) == comparable(got_plain)
    assert [r[0] for r in got_fast] == [row[0] for row in fast]


def test_an_executemany_of_many_rows_reads_back_cold(engine: Engine) -> None:
    keys, Item = setup(engine, autoincrement=True)
    rows = [{"tbl": f"t{i}", "det": f"d{i}", "row": {"i": i, "q": "it's 100% \\ \x00"}} for i in range(MANY)]
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), rows)
    assert len(assert_bound(engine, keys)) == MANY
    keys.clear_cache()  # as a new process: every row key unwrapped from the key table
    c = Item.__table__.c
    with engine.connect() as conn:
        got = conn.execute(select(c.tbl, c.det, c.row).order_by(c.id)).all()
    assert [tuple(r) for r in got] == [(r["tbl"], r["det"], r["row"]) for r in rows]


def test_new_row_keys_hold_their_bytes_and_leave_with_the_cache(engine: Engine, monkeypatch: Any) -> None:
    """Keys made for an INSERT are cached as ``RowKeyCipher`` (no use counter
    until one is counted, no second copy of the material once bound), each
    keeping the one ``AESGCM`` object its row's sealing built, so reading the
    rows back in this process builds none; the thread's slot holds the last
    row's key, and a rollback or an emptied cache takes it out."""
    keys, Item = setup(engine, autoincrement=True)
    rows = [{"tbl": f"t{i}", "det": f"d{i}", "row": {"i": i}} for i in range(MANY)]
    built = []
    real = ciphers.AESGCM
    monkeypatch.setattr(ciphers, "AESGCM", lambda key: built.append(1) or real(key))
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), rows)
    assert len(built) == MANY  # one per new key, when its row's value was sealed
    made = [e for e in keys.rows.cache._entries.values() if e.bound is not None]
    assert len(made) == MANY
    assert all(type(e.cipher) is RowKeyCipher and e.wrapped is None and e.uses is None for e in made)
    assert current_aead().pair[0] in {e.cipher for e in made}
    with engine.connect() as conn:  # the warm read back: the kept objects, none built
        assert len(conn.execute(select(Item.__table__.c.row)).all()) == MANY
    assert len(built) == MANY
    monkeypatch.undo()
    keys.clear_cache()
    assert current_aead().pair == (None, None)
    with engine.connect() as conn:
        trans = conn.begin()
        conn.execute(insert(Item.__table__), rows)
        assert current_aead().pair[0] is not None
        trans.rollback()
    assert current_aead().pair == (None, None) and not [e for e in keys.rows.cache._entries.values() if e.bound]


@pytest.mark.backends("postgresql")
def test_copy_is_binary_only_where_the_key_table_types_allow(engine: Engine) -> None:
    """psycopg: the key rows' COPY is binary into a key table as
    ``create_table`` makes it, text into one whose column types differ
    (a binary COPY into them would fail); both store the rows."""
    if engine.dialect.driver != "psycopg":
        pytest.skip("psycopg only")
    names = [*keyrows.VARYING, *keyrows.shared_values("x", kt.utcnow())]
    made = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    made.create_table()
    other = KeyManager(engine, LocalKeyProvider(os.urandom(32)), table_name="bulk_other_keys")
    other.create_table()
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE bulk_other_keys ALTER COLUMN created_at TYPE timestamp without time zone")
    for keys, binary in ((made, True), (other, False)):
        with engine.begin() as conn:
            assert (keyrows._binary_types(conn, keys.table, names) is not None) is binary
            keyrows.insert_key_rows(conn, keys.table, keyrows.shared_values("copied", kt.utcnow()), _key_rows(MANY, 10**12))
        assert len(_stored(engine, keys, "copied")) == MANY
