"""Search tokens follow every write path (Core and ORM, one row and many,
updates, deletes, upserts) in the writing transaction; the paths that cannot
be followed are refused before anything is written; a stale, forged or
missing token never makes lookup() return a wrong row, and verify_index
finds and repairs it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope.columns.searchable import indexes_of
from sa_envelope import KeyManager, UnsupportedQueryError, lookup
from support.search import search_models

D = dt.date


@pytest.fixture
def model(engine: Engine, local_keys: KeyManager) -> Any:
    Patient, _ = search_models(local_keys, bits=32)
    Patient.metadata.create_all(engine)
    return Patient


def _ids(found: list[Any]) -> set[int]:
    return {p.id for p in found}


def _assert_in_step(keys: KeyManager, model: Any) -> None:
    reports = keys.verify_index(model.__table__)
    assert [r.ok for r in reports] == [True, True, True], [str(r) for r in reports]


def _search(engine: Engine, model: Any, **asked: Any) -> set[int]:
    with Session(engine) as session:
        return _ids(
            lookup(
                session,
                getattr(model, {"startswith": "name", "contains": "notes"}.get(next(iter(asked)), "born")),
                **asked,
            )
        )


def test_core_and_orm_writes_keep_tokens_in_step(engine: Engine, local_keys: KeyManager, model: Any) -> None:
    t = model.__table__
    with engine.begin() as conn:  # Core: one row, many rows
        conn.execute(insert(t).values(id=1, name="Ada Lovelace", notes="penicillin", born=D(1815, 12, 10)))
        conn.execute(
            insert(t), [{"id": 2, "name": "Alan", "notes": "aspirin"}, {"id": 3, "name": "Grace", "notes": None}]
        )
    assert _search(engine, model, startswith="Ada") == {1}
    with Session(engine) as session:  # ORM: flush insert, update, delete; bulk insert and update
        session.add(model(id=4, name="Adam", notes="mild penicillin allergy", born=D(1950, 1, 1)))
        session.flush()
        session.get(model, 2).notes = "penicillin too"
        session.delete(session.get(model, 3))
        session.execute(insert(model), [{"id": 5, "name": "Adah", "born": D(1900, 1, 1)}])
        session.execute(update(model), [{"id": 1, "notes": "nothing", "born": D(1901, 1, 1)}])
        session.commit()
    assert _search(engine, model, contains="penicillin") == {2, 4}
    assert _search(engine, model, startswith="Ada") == {1, 4, 5}
    assert _search(engine, model, between=(D(1900, 1, 1), D(1950, 1, 1))) == {1, 4, 5}
    with engine.begin() as conn:  # Core update by key (to NULL too), delete by any criteria
        conn.execute(update(t).where(t.c.id == 4).values(name="Eve", born=None))
        conn.execute(delete(t).where(t.c.notes.is_(None)))  # deletes 5
    assert _search(engine, model, startswith="Ada") == {1}
    assert _search(engine, model, between=(D(1800, 1, 1), D(2000, 1, 1))) == {1}
    _assert_in_step(local_keys, model)
    with engine.begin() as conn:
        conn.execute(delete(t))
    assert _search(engine, model, contains="penicillin") == set()
    _assert_in_step(local_keys, model)
    with engine.connect() as conn:
        assert conn.execute(select(local_keys.search_table)).all() == []


@pytest.mark.parametrize("storage", ["table", None], ids=["token-table", "default"])
def test_insert_returning_keeps_tokens_in_step(engine: Engine, local_keys: KeyManager, storage: str | None) -> None:
    """``insert().returning(...)``: SQLAlchemy compiles no ``return_defaults()``
    beside it, so the new rows' keys come from the parameters; without them
    the INSERT is refused before it runs."""
    model, _ = search_models(local_keys, bits=32, storage=storage)
    model.metadata.create_all(engine)
    t = model.__table__
    with engine.begin() as conn:
        one = conn.execute(insert(t).returning(t.c.id, t.c.name), {"id": 1, "name": "Ada", "notes": "penicillin"})
        assert one.all() == [(1, "Ada")]
        many = conn.execute(
            insert(t).returning(t.c.id),
            [{"id": 2, "name": "Adam", "notes": None}, {"id": 3, "name": None, "notes": "pencil"}],
        )
        assert many.scalars().all() == [2, 3]
    assert _search(engine, model, startswith="Ada") == {1, 2}
    assert _search(engine, model, contains="pen") == {1, 3}
    _assert_in_step(local_keys, model)
    if not _in_arrays(model):  # the token table needs the new rows' keys: refused before it runs
        with engine.begin() as conn, pytest.raises(UnsupportedQueryError, match="RETURNING"):
            conn.execute(insert(t).returning(t.c.id), {"name": "Nobody"})


def test_a_rolled_back_write_leaves_no_tokens(engine: Engine, local_keys: KeyManager, model: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(model.__table__).values(id=1, name="Ada"))
    with Session(engine) as session:
        session.add(model(id=2, name="Adam"))
        session.get(model, 1).name = "Zed"
        session.flush()
        session.rollback()
    assert _search(engine, model, startswith="Ada") == {1}
    _assert_in_step(local_keys, model)


def _upsert(dialect: str, table: Any, row: dict[str, Any]) -> Any:
    if dialect == "mysql" or dialect == "mariadb":
        stmt = mysql.insert(table).values(**row)
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in row if c != "id"})
    module = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(table).values(**row)
    return stmt.on_conflict_do_update(index_elements=["id"], set_={c: stmt.excluded[c] for c in row if c != "id"})


def test_upserts_replace_the_rows_tokens(engine: Engine, local_keys: KeyManager, model: Any) -> None:
    t = model.__table__
    row = {"id": 1, "name": "Ada", "notes": "penicillin", "born": D(1815, 12, 10)}
    with engine.begin() as conn:
        conn.execute(_upsert(engine.dialect.name, t, row))  # inserts
        conn.execute(_upsert(engine.dialect.name, t, {**row, "name": "Bea", "notes": "aspirin"}))  # updates
    assert _search(engine, model, startswith="Ada") == set()
    assert _search(engine, model, startswith="Bea") == {1}
    assert _search(engine, model, contains="aspirin") == {1}
    _assert_in_step(local_keys, model)


def _in_arrays(model: Any) -> bool:
    return all(i.storage == "array" for i in indexes_of(model.__table__))


def test_writes_that_cannot_be_followed_are_refused_before_they_run(
    engine: Engine, local_keys: KeyManager, model: Any
) -> None:
    t = model.__table__
    with engine.begin() as conn:
        conn.execute(insert(t), [{"id": 1, "name": "Ada"}, {"id": 2, "name": "Alan"}])
    refused = [
        insert(t).values([{"id": 7, "name": "Ada"}, {"id": 8, "name": "Ada"}]),  # multi-row values()
        insert(t).from_select(["id", "name"], select(t.c.id + 10, t.c.name)),
        update(t).where(t.c.id == 1).values(name=t.c.notes),  # a SQL expression, not a value
    ]
    if not _in_arrays(model):  # a token table is keyed by the row: these would lose it
        refused += [
            update(t).where(t.c.name.is_not(None)).values(name="Zed"),  # not by primary key
            update(t).where(t.c.id == 1).values(id=9),  # the key itself
        ]
        if engine.dialect.name != "mysql":
            module = postgresql if engine.dialect.name == "postgresql" else sqlite
            refused.append(module.insert(t).values(id=1, name="Ada").on_conflict_do_nothing())
    for stmt in refused:
        with pytest.raises(UnsupportedQueryError, match="search_patients"), engine.begin() as conn:
            conn.execute(stmt)
    if not _in_arrays(model):
        with Session(engine) as session:
            with pytest.raises(UnsupportedQueryError, match="primary key"):
                session.execute(update(model).where(model.name.is_not(None)).values(notes="x"))
    with engine.connect() as conn:
        assert sorted(conn.execute(select(t.c.id)).scalars()) == [1, 2]
    assert _search(engine, model, startswith="A") == {1, 2}
    _assert_in_step(local_keys, model)


@pytest.mark.backends("postgresql")
def test_array_tokens_follow_writes_by_any_criteria(engine: Engine, local_keys: KeyManager, model: Any) -> None:
    """In array storage the tokens are in the row: an UPDATE by any criteria,
    a key change and ON CONFLICT DO NOTHING keep them in step."""
    t = model.__table__
    assert _in_arrays(model) and "notes_substring_tokens" not in model.__mapper__.attrs
    with engine.begin() as conn:
        conn.execute(
            insert(t), [{"id": 1, "name": "Ada", "notes": "aspirin"}, {"id": 2, "name": "Alan", "notes": None}]
        )
        conn.execute(update(t).where(t.c.name.is_not(None)).values(name="Zed"))
        conn.execute(update(t).where(t.c.id == 1).values(id=9))
        conn.execute(postgresql.insert(t).values(id=2, name="Ada").on_conflict_do_nothing())
        conn.execute(postgresql.insert(t).values(id=3, name="Bea", notes="aspirin").on_conflict_do_nothing())
        conn.execute(update(t).where(t.c.id == 3), {"notes": None})
        by_name = update(t).where(t.c.id == bindparam("key")).values(notes=bindparam("text"))
        conn.execute(by_name, [{"key": 9, "text": "asthma"}, {"key": 3, "text": "asthma too"}])
    with Session(engine) as session:
        session.execute(update(model).where(model.id.in_([9, 2])).values(notes="penicillin"))
        session.commit()
    assert _search(engine, model, startswith="Zed") == {9, 2}
    assert _search(engine, model, startswith="Ada") == set()
    assert _search(engine, model, contains="penicillin") == {9, 2}
    assert _search(engine, model, contains="aspirin") == set()
    assert _search(engine, model, contains="asthma") == {3}  # 9 was set again by the ORM
    _assert_in_step(local_keys, model)


def _forge(conn: Any, keys: KeyManager, model: Any) -> None:
    """A database writer: row 1's tokens copied onto row 3's key (and, in a
    token table, onto a row that does not exist); row 2's ciphertext swapped
    for row 1's (same table and column: it decrypts), its tokens kept; row
    3's own substring tokens deleted."""
    if _in_arrays(model):
        conn.execute(
            text(
                "UPDATE search_patients SET (name_prefix_tokens, born_range_tokens) = "
                "(SELECT name_prefix_tokens, born_range_tokens FROM search_patients WHERE id = 1) "
                "WHERE id = 3"
            )
        )
        conn.execute(text("UPDATE search_patients SET notes_substring_tokens = NULL WHERE id = 3"))
    else:
        tokens = keys.search_table.name
        for target in ("3", "99"):
            conn.execute(
                text(
                    f"INSERT INTO {tokens} (owner, name, row_key, token) "
                    f"SELECT owner, name, '{target}', token FROM {tokens} s WHERE row_key = '1' "
                    f"AND NOT EXISTS (SELECT 1 FROM {tokens} x WHERE x.owner = s.owner AND x.name = s.name "
                    f"AND x.token = s.token AND x.row_key = '{target}')"  # the primary key holds each once
                )
            )
        conn.execute(text(f"DELETE FROM {tokens} WHERE row_key = '3' AND name = 'notes/substring'"))
    conn.execute(
        text(
            "UPDATE search_patients SET notes = (SELECT notes FROM "
            "(SELECT notes FROM search_patients WHERE id = 1) AS s) WHERE id = 2"
        )
    )


def test_stale_forged_and_missing_tokens_never_give_a_wrong_row(
    engine: Engine, local_keys: KeyManager, model: Any
) -> None:
    t = model.__table__
    with engine.begin() as conn:
        conn.execute(
            insert(t),
            [
                {"id": 1, "name": "Ada", "notes": "penicillin", "born": D(1815, 12, 10)},
                {"id": 2, "name": "Zed", "notes": "aspirin", "born": D(1990, 5, 5)},
                {"id": 3, "name": "Adele", "notes": "asthma", "born": D(1991, 5, 5)},
            ],
        )
        _forge(conn, local_keys, model)
    assert _search(engine, model, startswith="Ada") == {1}  # 3 (and 99) hold forged "Ada" tokens
    assert _search(engine, model, startswith="Ad") == {1, 3}
    assert _search(engine, model, contains="penicillin") == {1}  # 2 holds it now, but no token says so
    assert _search(engine, model, contains="aspirin") == set()  # 2's old tokens: re-checked away
    assert _search(engine, model, contains="asthma") == set()  # 3's tokens are gone: a miss, never a wrong row
    assert _search(engine, model, between=(D(1815, 1, 1), D(1815, 12, 31))) == {1}
    reports = {r.index: r for r in local_keys.verify_index(t)}
    assert not reports["notes/substring"].ok
    assert bool(reports["notes/substring"].orphan_tokens) is not _in_arrays(model)  # arrays: none can outlive a row
    assert set(reports["notes/substring"].examples) == {"2", "3"}
    assert not reports["name/prefix"].ok and reports["name/prefix"].examples == ["3"]
    assert not any(r.ok for r in local_keys.verify_index(t, fix=True))
    _assert_in_step(local_keys, model)
    assert _search(engine, model, contains="penicillin") == {1, 2}
    assert _search(engine, model, contains="asthma") == {3}
