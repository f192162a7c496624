"""Core writes of row-scoped columns that need a statement rewritten, on every backend.

Each path (an upsert whose SET holds a Python value, a multi-row VALUES or
an ``insert().returning()`` whose primary keys the database makes, an
executemany whose ``values()`` holds one Python value, the same without
sorted RETURNING) is checked for: the stored bytes are envelopes, the values
read back equal what was written, each row's ciphertext is under the key
bound to that row's primary key, the caller's result is what SQLAlchemy
gives, and a failure in the middle of the statement leaves no row under a
key that is not stored with it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import JSON, Column, Integer, LargeBinary, MetaData, String, Table, bindparam, event, func, insert, select, type_coerce, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider, UnsupportedQueryError, faults
from sa_envelope.envelope import format as fmt
from support.paths import ROWS, assert_bound, assert_stored, raw_rows, read_back, row_keys_of, rows_as_dicts, setup
from support.row_scope import key_table_rows

from .test_write_paths import dialect_insert, orm_add


def live_row_keys(engine: Engine, keys: KeyManager) -> dict[int, Any]:
    t = keys.table
    with engine.connect() as conn:
        return dict(conn.execute(select(t.c.id, t.c.row_digest).where(t.c.scope == "row", t.c.status == "active")).all())


def set_python_value(engine: Engine, table: Any, **values: Any) -> Any:
    """The backend's upsert on the primary key whose SET holds ``values``."""
    stmt = dialect_insert(engine, table)
    if engine.dialect.name in ("mysql", "mariadb"):
        return stmt.on_duplicate_key_update(**values)
    return stmt.on_conflict_do_update(index_elements=[table.c.id], set_=values)


# -- upserts whose SET holds a Python value ------------------------------------------------


def test_upsert_setting_a_python_value_in_a_row_scoped_column(engine: Engine) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    before = live_row_keys(engine, keys)
    old = assert_bound(engine, keys)
    stmt = set_python_value(engine, Item.__table__, row={"set": "by the upsert"}, tbl="updated")
    with engine.begin() as conn:
        conn.execute(stmt, {"id": 2, "tbl": "ignored", "det": "ignored", "row": {"proposed": 2}})
        conn.execute(stmt, {"id": 4, "tbl": "new", "det": "new", "row": {"proposed": 4}})
    expected = [ROWS[0], (2, "updated", ROWS[1][2], {"set": "by the upsert"}), ROWS[2], (4, "new", "new", {"proposed": 4})]
    assert_stored(engine, keys, expected)
    assert read_back(engine, Item) == expected
    bound = assert_bound(engine, keys)
    assert bound[2] == old[2]  # the existing row kept its key: sealed under it, nothing shredded
    after = live_row_keys(engine, keys)
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == 4


def test_upsert_executemany_seals_the_set_value_per_row(engine: Engine) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    old = assert_bound(engine, keys)
    t = Item.__table__
    fixed = set_python_value(engine, t, row={"same": "value"})
    per_row = set_python_value(engine, t, row=bindparam("new_row"))
    with engine.begin() as conn:
        result = conn.execute(fixed, [{"id": 1, "row": {"p": 1}}, {"id": 3, "row": {"p": 3}}, {"id": 4, "row": {"p": 4}}])
        if engine.dialect.name in ("mysql", "mariadb"):
            assert result.rowcount == 2 + 2 + 1  # ON DUPLICATE KEY: 2 per updated row, 1 per inserted row
        conn.execute(per_row, [{"id": 2, "row": {"p": 2}, "new_row": {"mine": 2}}, {"id": 5, "row": {"p": 5}, "new_row": None}])
    with engine.connect() as conn:
        stored = raw_rows(conn)
    assert stored[1][2] != stored[3][2]  # one plaintext, two ciphertexts under two keys
    got = {r[0]: r[3] for r in read_back(engine, Item)}
    assert got == {1: {"same": "value"}, 2: {"mine": 2}, 3: {"same": "value"}, 4: {"p": 4}, 5: {"p": 5}}
    bound = assert_bound(engine, keys)
    assert {pk: bound[pk] for pk in old} == old


def test_a_failed_upsert_executemany_writes_no_row_and_keeps_the_keys(engine: Engine) -> None:
    """The last parameter set fails (NOT NULL): the rows before it are not
    left written (MySQL and SQLite keep the transaction open), and the
    existing rows keep their values and keys."""
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    t = Table(
        "items", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("code", String(10), nullable=False),
        Column("row", EncryptedType(JSON, keys, scope="row")),
    )
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(t), [{"id": 1, "code": "a", "row": {"v": 1}}, {"id": 2, "code": "b", "row": {"v": 2}}])
    with engine.connect() as conn:
        before = (raw_rows_of(conn), key_table_rows(conn, keys))
    stmt = set_python_value(engine, t, row={"set": 1}, code="c")
    with engine.connect() as conn:
        with pytest.raises((IntegrityError, DBAPIError)):
            conn.execute(stmt, [{"id": 1, "code": "x", "row": None}, {"id": 3, "code": "y", "row": {"v": 3}}, {"id": 4, "code": None, "row": {"v": 4}}])
        if conn.dialect.name == "postgresql":
            conn.rollback()
        conn.commit()  # what survives the failed statement
    with engine.connect() as conn:
        assert raw_rows_of(conn) == before[0]
        assert [r for r in key_table_rows(conn, keys) if r[1] != "row" or r in before[1]] == before[1]
        assert conn.execute(select(t.c.row).order_by(t.c.id)).scalars().all() == [{"v": 1}, {"v": 2}]
    assert_bound(engine, keys)


def raw_rows_of(conn: Any) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in conn.execute(select(Table("items", MetaData(), autoload_with=conn))))


@pytest.mark.parametrize("point", ["rowkey.create.before_insert", "rowkey.create.after_insert"])
def test_a_failure_making_an_upserts_key_leaves_nothing_behind(engine: Engine, point: str) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts()[:1])
    with engine.connect() as conn:
        before = (sorted(raw_rows(conn).items()), key_table_rows(conn, keys))

    def fail(name: str) -> None:
        if name == point:
            raise RuntimeError(f"injected at {name}")

    stmt = set_python_value(engine, Item.__table__, row={"set": 1})
    with engine.connect() as conn:
        with faults.inject(fail), pytest.raises(RuntimeError):
            conn.execute(stmt, [{"id": 1, "row": {"p": 1}}, {"id": 2, "row": {"p": 2}}])
        conn.rollback()
    with engine.connect() as conn:
        assert (sorted(raw_rows(conn).items()), key_table_rows(conn, keys)) == before


# -- the database makes the primary keys ------------------------------------------------


def notes(engine: Engine, *, implicit_returning: bool = True) -> tuple[KeyManager, Table]:
    """A table whose primary key the database makes, with a unique plain column to fail on."""
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    t = Table(
        "notes", MetaData(),
        Column("id", Integer, primary_key=True),
        Column("code", String(10), unique=True),
        Column("tbl", EncryptedType(String(50), keys)),
        Column("row", EncryptedType(JSON, keys, scope="row")),
        implicit_returning=implicit_returning,
    )
    t.create(engine)
    return keys, t


NOTES = [{"code": f"c{i}", "tbl": f"table value {i}", "row": {"n": i, "text": "ünï ✓" * i}} for i in range(1, 4)]


def check_notes(engine: Engine, keys: KeyManager, t: Table, expected: list[dict[str, Any]]) -> None:
    """Stored as envelopes (GCM under a table key, GCM under a row key bound
    to the row), read back as written, each row under its own key."""
    with engine.connect() as conn:
        ids = conn.execute(select(t.c.id).order_by(t.c.id)).scalars().all()
        got = conn.execute(select(t.c.code, t.c.tbl, t.c.row).order_by(t.c.id)).all()
        raw = conn.execute(select(t.c.id, type_coerce(t.c.tbl, LargeBinary()))).all()
        scopes = dict(conn.execute(select(keys.table.c.id, keys.table.c.scope)).all())
    assert [dict(r._mapping) for r in got] == expected
    assert ids == list(range(1, len(expected) + 1))
    for pk, value in raw:
        assert fmt.read_header(bytes(value))[0] == fmt.VERSION_GCM and scopes[fmt.read_header(bytes(value))[1]] == "table"
        assert expected[pk - 1]["tbl"].encode() not in bytes(value)
    bound = assert_bound(engine, keys, "notes")  # row: GCM header, a live row key bound to the row
    assert sorted(bound) == [pk for pk in ids if expected[pk - 1]["row"] is not None]


def test_multi_values_insert_whose_primary_keys_the_database_makes(engine: Engine) -> None:
    keys, t = notes(engine)
    with engine.begin() as conn:
        result = conn.execute(insert(t).values(NOTES))
        assert result.rowcount == 3
        made = [tuple(pk) for pk in result.inserted_primary_key_rows]  # RETURNING; unknown to a lastrowid loop
        assert made == ([(None,)] * 3 if conn.dialect.postfetch_lastrowid else [(1,), (2,), (3,)])
        conn.execute(insert(t).values([{"code": "c4", "tbl": "table value 4", "row": None}]))
    check_notes(engine, keys, t, [*NOTES, {"code": "c4", "tbl": "table value 4", "row": None}])


def test_multi_values_without_sorted_returning_runs_one_row_per_statement(engine: Engine) -> None:
    """``implicit_returning=False`` (as MySQL has no RETURNING): each row's
    ``lastrowid``; PostgreSQL has none, so there it is refused before anything is written."""
    keys, t = notes(engine, implicit_returning=False)
    with engine.connect() as conn:
        if not conn.dialect.postfetch_lastrowid:
            with pytest.raises(UnsupportedQueryError, match="primary key"):
                conn.execute(insert(t).values(NOTES))
            assert conn.execute(select(func.count()).select_from(t)).scalar() == 0
            assert conn.execute(select(func.count()).where(keys.table.c.scope == "row")).scalar() == 0
            return
        result = conn.execute(insert(t).values(NOTES))
        assert result.rowcount == 3
        conn.execute(insert(t), [{"code": "c4", "tbl": "table value 4", "row": {"n": 4}}, {"code": "c5", "tbl": "table value 5", "row": {"n": 5}}])
        conn.execute(insert(t).values(row={"same": 6}), [{"code": "c6", "tbl": "table value 6"}, {"code": "c7", "tbl": "table value 7"}])
        conn.commit()
    more = [{"code": "c4", "tbl": "table value 4", "row": {"n": 4}}, {"code": "c5", "tbl": "table value 5", "row": {"n": 5}}]
    same = [{"code": f"c{i}", "tbl": f"table value {i}", "row": {"same": 6}} for i in (6, 7)]
    check_notes(engine, keys, t, [*NOTES, *more, *same])


@pytest.mark.parametrize("implicit_returning", [True, False], ids=["returning", "lastrowid"])
def test_a_failed_multi_values_insert_writes_no_row(engine: Engine, implicit_returning: bool) -> None:
    """The third row repeats a unique code: the statement writes nothing, as
    the multi-row INSERT it replaces would not have (MySQL and SQLite keep
    the transaction open and commit what the caller did before)."""
    keys, t = notes(engine, implicit_returning=implicit_returning)
    if not implicit_returning and not engine.dialect.postfetch_lastrowid:
        return  # PostgreSQL: refused (test above)
    with engine.connect() as conn:
        conn.execute(insert(t).values(NOTES[:1]))
        with pytest.raises(IntegrityError):
            conn.execute(insert(t).values([{**NOTES[1], "code": "c2"}, {**NOTES[2], "code": "c3"}, {**NOTES[2], "code": "c1"}]))
        if conn.dialect.name == "postgresql":
            conn.rollback()
            conn.execute(insert(t).values(NOTES[:1]))
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t)).scalar() == 1
    assert_bound(engine, keys, "notes")


def test_a_failed_key_binding_leaves_no_row_under_an_unstored_key(engine: Engine) -> None:
    """The INSERT ran, binding its keys fails: the error reaches the caller;
    what a caller still commits names only keys stored with it."""
    keys, t = notes(engine)

    inserted = []

    def fail(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        text = statement.lstrip().upper()
        if text.startswith("INSERT INTO NOTES"):
            inserted.append(True)
        elif inserted and (text.startswith("UPDATE") or text.startswith("INSERT")) and "SA_ENVELOPE_KEYS" in text:
            raise RuntimeError("the key binding failed")  # the rows are in; their keys' binding fails

    with engine.connect() as conn:
        conn.execute(insert(t).values(NOTES[:1]))  # the digest key exists
        event.listen(engine, "before_cursor_execute", fail)
        try:
            with pytest.raises(Exception, match="the key binding failed"):
                conn.execute(insert(t).values(NOTES[1:]))
        finally:
            event.remove(engine, "before_cursor_execute", fail)
        conn.commit()  # the caller commits what it still has: the rolled-back transaction held the rows
    with engine.connect() as conn:
        stored_keys = set(conn.execute(select(keys.table.c.id)).scalars())
        named = row_keys_of(conn, "notes")
    assert set(named.values()) <= stored_keys
    assert named == {}  # rolled back with their keys' failure: no row under an unstored key


@pytest.mark.parametrize("many", [False, True], ids=["single", "executemany"])
def test_insert_returning_whose_primary_keys_the_database_makes(engine: Engine, many: bool) -> None:
    keys, t = notes(engine)
    rows = NOTES if many else NOTES[:1]
    with engine.begin() as conn:
        result = conn.execute(insert(t).returning(t.c.tbl, t.c.row), rows if many else rows[0])
        assert list(result.keys()) == ["tbl", "row"]
        assert [tuple(r) for r in result] == [(r["tbl"], r["row"]) for r in rows]
        with_pk = conn.execute(insert(t).returning(t.c.row, t.c.id), [{**r, "code": f"x{i}"} for i, r in enumerate(rows)])
        assert [tuple(r) for r in with_pk] == [(r["row"], len(rows) + i + 1) for i, r in enumerate(rows)]
        mapped = conn.execute(insert(t).returning(t.c.code), {"code": "m", "tbl": "table value m", "row": {"m": 1}}).mappings().all()
        assert mapped == [{"code": "m"}]
    expected = [*rows, *({**r, "code": f"x{i}"} for i, r in enumerate(rows)), {"code": "m", "tbl": "table value m", "row": {"m": 1}}]
    check_notes(engine, keys, t, expected)


@pytest.mark.parametrize("many", [False, True], ids=["single", "executemany"])
def test_insert_returning_the_whole_table_or_the_mapped_class(engine: Engine, many: bool) -> None:
    """``returning(t)`` and the ORM's ``insert(Model).returning(Model)``: the
    table expands to its columns, the primary key among them is the one the
    keys are bound to (not a column at the same position of the clause list),
    and SQLAlchemy's own ``column in [columns]`` tests on the encrypted columns work."""
    keys, t = notes(engine)
    rows = NOTES if many else NOTES[:1]
    with engine.begin() as conn:
        got = conn.execute(insert(t).returning(t), rows if many else rows[0]).mappings().all()
    assert [{k: r[k] for k in ("code", "tbl", "row")} for r in got] == rows
    assert [r["id"] for r in got] == list(range(1, len(rows) + 1))

    class Base(DeclarativeBase):
        pass

    class Note(Base):
        __table__ = t

    more = [{**r, "code": f"o{i}"} for i, r in enumerate(rows)]
    with Session(engine) as session:
        stmt = insert(Note).returning(Note)
        objs = session.scalars(stmt, more).all() if many else session.scalars(stmt.values(**more[0])).all()
        assert [(o.id, o.code, o.tbl, o.row) for o in objs] == [
            (len(rows) + i + 1, r["code"], r["tbl"], r["row"]) for i, r in enumerate(more)
        ]
        session.commit()
    check_notes(engine, keys, t, [*rows, *more])


# -- one Python value in values(), many rows ------------------------------------------------


def test_executemany_with_a_row_scoped_value_in_values_gives_each_row_its_ciphertext(engine: Engine) -> None:
    keys, Item = setup(engine)
    t = Item.__table__
    with engine.begin() as conn:
        conn.execute(insert(t).values(row={"same": 1}), [{"id": i, "tbl": f"t{i}", "det": "d"} for i in (1, 2, 3)])
    inserted = assert_bound(engine, keys)
    assert sorted(inserted) == [1, 2, 3]
    with engine.begin() as conn:
        conn.execute(update(t).where(t.c.id == bindparam("pid")).values(row={"same": 2}), [{"pid": 1}, {"pid": 3}])
        conn.execute(update(t).where(t.c.id == 2).values(row={"one": 2}))
    with engine.connect() as conn:
        stored = raw_rows(conn)
    assert len({v[2] for v in stored.values()}) == 3
    assert [r[3] for r in read_back(engine, Item)] == [{"same": 2}, {"one": 2}, {"same": 2}]
    assert assert_bound(engine, keys) == inserted  # the updates wrote under the rows' own keys


def test_refusals_that_stay(engine: Engine) -> None:
    """Rows the database keys that cannot become an executemany, and an
    executemany RETURNING without sorted RETURNING, are refused before anything is written."""
    keys, t = notes(engine)
    with engine.connect() as conn:
        with pytest.raises(UnsupportedQueryError, match="SQL expressions"):
            conn.execute(insert(t).values([{"code": func.lower("A"), "row": {"a": 1}}, {"code": "b", "row": {"b": 1}}]))
        with pytest.raises(UnsupportedQueryError, match="different columns"):
            conn.execute(insert(t).values([{"code": "a", "row": {"a": 1}}, {"row": {"b": 1}}]))
        assert conn.execute(select(func.count()).select_from(t)).scalar() == 0
        assert conn.execute(select(func.count()).where(keys.table.c.scope.in_(["row", "row-digest"]))).scalar() == 0


def test_upsert_executemany_with_returning_and_a_python_value_in_the_set(engine: Engine) -> None:
    """SQLAlchemy 2.1 runs it one row per statement on PostgreSQL and SQLite;
    where it would fold the rows under one SET (MariaDB, SQLAlchemy 2.0) it is
    refused before anything is written."""
    import sqlalchemy

    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    old = assert_bound(engine, keys)
    t = Item.__table__
    stmt = set_python_value(engine, t, row={"same": 1}).returning(t.c.id, t.c.row)
    params = [{"id": 1, "row": {"p": 1}}, {"id": 4, "row": {"p": 4}}, {"id": 3, "row": {"p": 3}}]
    with engine.connect() as conn:
        before = (sorted(raw_rows(conn).items()), key_table_rows(conn, keys))
        folds = conn.dialect.name in ("mysql", "mariadb") or sqlalchemy.__version__.startswith("2.0.")
        if folds:
            with pytest.raises(UnsupportedQueryError, match="SET writes a row-scoped value"):
                conn.execute(stmt, params)
            assert (sorted(raw_rows(conn).items()), key_table_rows(conn, keys)) == before
            return
        assert [tuple(r) for r in conn.execute(stmt, params)] == [(1, {"same": 1}), (4, {"p": 4}), (3, {"same": 1})]
        conn.commit()
    assert {r[0]: r[3] for r in read_back(engine, Item)} == {1: {"same": 1}, 2: ROWS[1][3], 3: {"same": 1}, 4: {"p": 4}}
    bound = assert_bound(engine, keys)
    assert {pk: bound[pk] for pk in old} == old
