"""Every way SQLAlchemy writes a row encrypts it, or refuses before anything is written.

Each case writes the same rows through one path, on every backend, into a
table with a table-scoped, a deterministic and a row-scoped column; then the
stored bytes are checked to be envelopes under the right kind of key (one
row key per row, bound to it: the ORM read checks the binding) and the
values read back must equal what was written. Refused cases check the error
class and that neither a row nor a key was written.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from sqlalchemy import bindparam, delete, func, insert, literal, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import KeyManager, UnsupportedQueryError
from support.paths import NEW, ROWS, assert_stored, read_back, rows_as_dicts, setup

Writer = Callable[[Engine, KeyManager, Any, list[dict[str, Any]]], None]


def dialect_insert(engine: Engine, table: Any) -> Any:
    """The backend's own INSERT construct (the one with upserts)."""
    return {"postgresql": postgresql, "sqlite": sqlite}.get(engine.dialect.name, mysql).insert(table)


def upsert(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> Any:
    """An upsert on the primary key that sets every encrypted column to the proposed value."""
    stmt = dialect_insert(engine, table)
    if engine.dialect.name in ("mysql", "mariadb"):
        return stmt.on_duplicate_key_update(
            tbl=stmt.inserted.tbl, det=stmt.inserted.det, row=stmt.inserted.row
        )
    return stmt.on_conflict_do_update(
        index_elements=[table.c.id], set_={"tbl": stmt.excluded.tbl, "det": stmt.excluded.det, "row": stmt.excluded.row}
    )


# -- inserts ------------------------------------------------------------------------------


def orm_add(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        s.add_all([Item(**r) for r in rows])
        s.commit()


def orm_merge(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        for r in rows:
            s.merge(Item(**r))
        s.commit()


def orm_bulk_insert(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        s.execute(insert(Item), rows)
        s.commit()


def orm_bulk_insert_returning(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        got = s.execute(insert(Item).returning(Item.id, Item.row, sort_by_parameter_order=True), rows).all()
        s.commit()
    assert [g.row for g in got] == [r["row"] for r in rows]


def bulk_insert_mappings(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        s.bulk_insert_mappings(Item, rows)
        s.commit()


def bulk_save_objects(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        s.bulk_save_objects([Item(**r) for r in rows])
        s.commit()


def core_insert_one_by_one(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for r in rows:
            conn.execute(insert(Item.__table__), r)


def core_executemany(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), rows)


def core_values(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for r in rows:
            conn.execute(insert(Item.__table__).values(**r))


def core_multi_values(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__).values(rows))


def core_returning(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    t = Item.__table__
    with engine.begin() as conn:
        got = conn.execute(insert(t).returning(t.c.tbl, t.c.det, t.c.row, sort_by_parameter_order=True), rows).all()
    assert [tuple(g) for g in got] == [(r["tbl"], r["det"], r["row"]) for r in rows]


def core_upsert_inserts(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(upsert(engine, Item.__table__, rows), rows)


def core_upsert_do_nothing(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    if engine.dialect.name in ("mysql", "mariadb"):
        stmt = dialect_insert(engine, Item.__table__).prefix_with("IGNORE")
    else:
        stmt = dialect_insert(engine, Item.__table__).on_conflict_do_nothing()
    with engine.begin() as conn:
        conn.execute(stmt, rows)


INSERTS = [
    orm_add,
    orm_merge,
    orm_bulk_insert,
    bulk_insert_mappings,
    bulk_save_objects,
    core_insert_one_by_one,
    core_executemany,
    core_values,
    core_multi_values,
    core_returning,
    core_upsert_inserts,
    core_upsert_do_nothing,
]


@pytest.mark.parametrize("write", INSERTS, ids=[w.__name__ for w in INSERTS])
def test_insert_paths_encrypt(engine: Engine, write: Writer) -> None:
    keys, Item = setup(engine)
    write(engine, keys, Item, rows_as_dicts())
    assert_stored(engine, keys, ROWS)
    assert read_back(engine, Item) == ROWS


AUTOINCREMENT_INSERTS = [
    orm_add,
    orm_bulk_insert,
    orm_bulk_insert_returning,
    bulk_insert_mappings,
    core_insert_one_by_one,
    core_executemany,
    core_values,
    core_multi_values,
    core_returning,
]


@pytest.mark.parametrize("write", AUTOINCREMENT_INSERTS, ids=[w.__name__ for w in AUTOINCREMENT_INSERTS])
def test_insert_paths_with_autoincrement_keys(engine: Engine, write: Writer) -> None:
    """The database makes the primary key: the row key is bound after the INSERT."""
    keys, Item = setup(engine, autoincrement=True)
    write(engine, keys, Item, rows_as_dicts(with_id=False))
    assert_stored(engine, keys, ROWS)
    assert read_back(engine, Item) == ROWS
    with engine.connect() as conn:  # every key bound to its row once the INSERT made the primary key
        t = keys.table
        assert conn.execute(select(func.count()).where(t.c.scope == "row", t.c.row_digest.is_(None))).scalar() == 0


# -- updates ------------------------------------------------------------------------------


def orm_attributes(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        for r in rows:
            item = s.get(Item, r["id"])
            item.tbl, item.det, item.row = r["tbl"], r["det"], r["row"]
        s.commit()


def orm_bulk_update(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        s.execute(update(Item), rows)
        s.commit()


def bulk_update_mappings(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        s.bulk_update_mappings(Item, rows)
        s.commit()


def orm_update_where_pk(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with Session(engine) as s:
        for r in rows:
            s.execute(update(Item).where(Item.id == r["id"]).values(tbl=r["tbl"], det=r["det"], row=r["row"]))
        s.commit()


def core_update_where_pk(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    t = Item.__table__
    with engine.begin() as conn:
        for r in rows:
            conn.execute(update(t).where(t.c.id == r["id"]).values(tbl=r["tbl"], det=r["det"], row=r["row"]))


def core_update_executemany(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    t = Item.__table__
    stmt = update(t).where(t.c.id == bindparam("pid"))
    with engine.begin() as conn:
        conn.execute(stmt, [{"pid": r["id"], "tbl": r["tbl"], "det": r["det"], "row": r["row"]} for r in rows])


def core_update_returning(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    t = Item.__table__
    with engine.begin() as conn:
        for r in rows:
            stmt = update(t).where(t.c.id == r["id"]).values(tbl=r["tbl"], det=r["det"], row=r["row"])
            if conn.dialect.update_returning:
                got = conn.execute(stmt.returning(t.c.tbl, t.c.det, t.c.row)).one()
                assert tuple(got) == (r["tbl"], r["det"], r["row"])
            else:
                conn.execute(stmt)


def core_upsert_updates(engine: Engine, keys: KeyManager, Item: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(upsert(engine, Item.__table__, rows), rows)


UPDATES = [
    orm_attributes,
    orm_merge,
    orm_bulk_update,
    bulk_update_mappings,
    orm_update_where_pk,
    core_update_where_pk,
    core_update_executemany,
    core_update_returning,
    core_upsert_updates,
]


@pytest.mark.parametrize("write", UPDATES, ids=[w.__name__ for w in UPDATES])
def test_update_paths_encrypt_under_the_rows_keys(engine: Engine, write: Writer) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    with engine.connect() as conn:
        before = {r[0]: r[1] for r in conn.execute(select(keys.table.c.id, keys.table.c.row_digest).where(keys.table.c.scope == "row"))}
    write(engine, keys, Item, rows_as_dicts(NEW))
    assert_stored(engine, keys, NEW)
    assert read_back(engine, Item) == NEW
    with engine.connect() as conn:  # the rows kept their keys: no new row key, none shredded
        t = keys.table
        after = {r[0]: r[1] for r in conn.execute(select(t.c.id, t.c.row_digest).where(t.c.scope == "row", t.c.status == "active"))}
    assert after == before


def test_core_executemany_of_many_rows_makes_keys_in_one_statement(engine: Engine) -> None:
    keys, Item = setup(engine)
    statements: list[str] = []
    from sqlalchemy import event

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "sa_envelope_keys" in statement and statement.lstrip().upper().startswith(("INSERT", "COPY")):
            statements.append(statement)

    rows = [{"id": i, "tbl": f"n{i}", "det": f"d{i % 7}", "row": {"i": i}} for i in range(60)]  # PostgreSQL COPYs from 100
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), rows[:1])  # the table key and the digest key
        event.listen(engine, "before_cursor_execute", count)
        try:
            conn.execute(insert(Item.__table__), rows[1:])
        finally:
            event.remove(engine, "before_cursor_execute", count)
    assert len(statements) == 1
    with Session(engine) as s:
        assert [i.row for i in s.scalars(select(Item).order_by(Item.id))] == [r["row"] for r in rows]


def test_explicit_row_keys_still_work(engine: Engine) -> None:
    keys, Item = setup(engine)
    t = Item.__table__
    with engine.begin() as conn:
        key = keys.new_row_key(conn, "items", primary_key=1)
        conn.execute(insert(t), {"id": 1, "tbl": "a", "det": "b", "row": key.value({"c": 1})})
    with engine.connect() as conn:
        assert key.key_id in {k for k in conn.execute(select(keys.table.c.id).where(keys.table.c.scope == "row")).scalars()}
    assert read_back(engine, Item) == [(1, "a", "b", {"c": 1})]


def test_delete_returning_decrypts(engine: Engine) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    t = Item.__table__
    with engine.begin() as conn:
        if not conn.dialect.delete_returning:
            pytest.skip(f"{conn.dialect.name} has no DELETE ... RETURNING")  # MariaDB < 10.0.5 only
        got = conn.execute(delete(t).where(t.c.id == 2).returning(t.c.tbl, t.c.det, t.c.row)).one()
    assert tuple(got) == ROWS[1][1:]


# -- refused -------------------------------------------------------------------------------


def _refused_cases(engine: Engine, Item: Any) -> dict[str, Callable[[Any], Any]]:
    t = Item.__table__
    stmt = dialect_insert(engine, t)
    mysql_like = engine.dialect.name in ("mysql", "mariadb")

    def set_(**values: Any) -> Any:
        if mysql_like:
            return stmt.on_duplicate_key_update(**values)
        return stmt.on_conflict_do_update(index_elements=[t.c.id], set_=values)

    proposed = stmt.inserted if mysql_like else stmt.excluded
    return {
        "insert_from_select": lambda c: c.execute(insert(t).from_select(["id", "tbl"], select(t.c.id + 10, t.c.tbl))),
        "update_rows_not_by_pk": lambda c: c.execute(update(t).where(t.c.id > 1).values(row={"a": 1})),
        "update_literal": lambda c: c.execute(update(t).where(t.c.id == 1).values(tbl=literal("plain"))),
        "upsert_other_column": lambda c: c.execute(set_(tbl=proposed.det), {"id": 1, "tbl": "a", "det": "b"}),
        "upsert_function": lambda c: c.execute(set_(tbl=func.lower("x")), {"id": 1, "tbl": "a"}),
    }


REFUSED = ["insert_from_select", "update_rows_not_by_pk", "update_literal", "upsert_other_column", "upsert_function"]


@pytest.mark.parametrize("case", REFUSED)
def test_refused_writes_write_nothing(engine: Engine, case: str) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    with engine.connect() as conn:
        before = (sorted(raw_rows_of(conn)), sorted(conn.execute(select(keys.table)).all()))
    with engine.connect() as conn:
        with pytest.raises(UnsupportedQueryError) as err:
            _refused_cases(engine, Item)[case](conn)
        assert "items" in str(err.value)
        # refused before anything was written, even in the refused statement's own transaction
        assert (sorted(raw_rows_of(conn)), sorted(conn.execute(select(keys.table)).all())) == before
        conn.rollback()


def raw_rows_of(conn: Any) -> list[tuple[Any, ...]]:
    from support.paths import raw_rows

    return sorted(raw_rows(conn).items())


def test_upsert_of_a_row_scoped_column_on_another_unique_key_is_refused(engine: Engine) -> None:
    from sqlalchemy import JSON, Column, Integer, MetaData, String, Table

    from sa_envelope import EncryptedType

    keys, _ = setup(engine)
    t = Table(
        "accounts", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", String(50), unique=True),
        Column("row", EncryptedType(JSON, keys, scope="row")),
    )
    t.create(engine)
    stmt = dialect_insert(engine, t)
    if engine.dialect.name in ("mysql", "mariadb"):
        upsert_ = stmt.on_duplicate_key_update(row=stmt.inserted.row)
    else:
        upsert_ = stmt.on_conflict_do_update(index_elements=[t.c.email], set_={"row": stmt.excluded.row})
    with engine.connect() as conn:
        with pytest.raises(UnsupportedQueryError, match="conflict target"):
            conn.execute(upsert_, {"id": 1, "email": "a@example.com", "row": {"a": 1}})
        assert conn.execute(select(func.count()).select_from(t)).scalar() == 0
        assert conn.execute(select(func.count()).where(keys.table.c.scope == "row")).scalar() == 0


def test_autoincrement_rows_get_keys_bound_to_the_primary_keys_the_database_made(engine: Engine) -> None:
    """Multi-row ``values([...])`` and ``returning()`` without the primary keys
    (once refused): each row's key is bound to the primary key the database made."""
    from support.paths import assert_bound

    keys, Item = setup(engine, autoincrement=True)
    t = Item.__table__
    rows = rows_as_dicts(with_id=False)
    with engine.begin() as conn:
        conn.execute(insert(t).values(rows[:2]))
        got = conn.execute(insert(t).returning(t.c.row), rows[2:]).all()
    assert got == [(rows[2]["row"],)]
    assert_stored(engine, keys, ROWS)
    assert read_back(engine, Item) == ROWS
    assert sorted(assert_bound(engine, keys)) == [1, 2, 3]


def test_a_failed_core_insert_of_an_existing_primary_key_leaves_that_rows_keys(engine: Engine) -> None:
    """MySQL and SQLite keep the transaction going after a duplicate key: the
    existing row's row key must not have been shredded by the failed INSERT."""
    from sqlalchemy.exc import IntegrityError

    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    with engine.connect() as conn:
        savepoint = conn.begin_nested() if conn.dialect.name == "postgresql" else None
        with pytest.raises(IntegrityError):
            conn.execute(insert(Item.__table__), {"id": 1, "tbl": "dup", "det": "dup", "row": {"dup": 1}})
        if savepoint is not None:
            savepoint.rollback()
        conn.commit()
    assert read_back(engine, Item) == ROWS


def test_a_core_insert_shreds_the_keys_a_deleted_row_with_that_primary_key_left(engine: Engine) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    t, kt = Item.__table__, keys.table
    with engine.begin() as conn:
        conn.execute(delete(t).where(t.c.id == 1))  # Core: keys are not shredded
        conn.execute(insert(t), {"id": 1, "tbl": "again", "det": "again", "row": {"again": 1}})
    with engine.connect() as conn:
        statuses = sorted(conn.execute(select(kt.c.status).where(kt.c.scope == "row")).scalars())
    assert statuses == ["active", "active", "active", "shredded"]
    assert read_back(engine, Item)[0] == (1, "again", "again", {"again": 1})


def test_an_upsert_setting_python_values_encrypts_them(engine: Engine) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    t = Item.__table__
    stmt = dialect_insert(engine, t)
    if engine.dialect.name in ("mysql", "mariadb"):
        stmt = stmt.on_duplicate_key_update(tbl="fixed", det="fixed-det")
    else:
        stmt = stmt.on_conflict_do_update(index_elements=[t.c.id], set_={"tbl": "fixed", "det": "fixed-det"})
    with engine.begin() as conn:
        conn.execute(stmt, {"id": 2, "tbl": "ignored", "det": "ignored", "row": None})
    expected = [ROWS[0], (2, "fixed", "fixed-det", ROWS[1][3]), ROWS[2]]
    assert_stored(engine, keys, expected)
    assert read_back(engine, Item) == expected


def test_insert_ignore_and_do_nothing_over_existing_rows_keep_their_keys(engine: Engine) -> None:
    keys, Item = setup(engine)
    orm_add(engine, keys, Item, rows_as_dicts())
    with engine.connect() as conn:
        before = raw_rows_of(conn)
    clash = [{"id": 1, "tbl": "clash", "det": "clash", "row": {"clash": 1}}, {"id": 4, "tbl": "new", "det": "new", "row": {"n": 4}}]
    core_upsert_do_nothing(engine, keys, Item, clash)
    with engine.connect() as conn:
        assert raw_rows_of(conn)[:3] == before
    assert read_back(engine, Item) == [*ROWS, (4, "new", "new", {"n": 4})]


def test_a_sql_default_of_an_encrypted_column_is_refused(engine: Engine) -> None:
    """``default=func.lower(...)`` would be rendered into the INSERT: plaintext."""
    from sqlalchemy import Column, Integer, MetaData, String, Table

    from sa_envelope import EncryptedType

    keys, _ = setup(engine)
    t = Table(
        "defaults", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("note", EncryptedType(String(20), keys), default=func.lower("PLAIN")),
    )
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(insert(t), {"id": 1, "note": "given"})  # given: the default does not run
        with pytest.raises(UnsupportedQueryError, match="SQL default"):
            conn.execute(insert(t), {"id": 2})
        assert conn.execute(select(func.count()).select_from(t)).scalar() == 1
