"""Row keys of rows whose primary key the database makes (autoincrement).

Inside a transaction the keys are made in memory before the INSERT and
wrapped once, bound to the new primary keys and inserted right after it:
no key row is ever written unbound and then UPDATEd. A failure between the
rows and their keys rolls both back. Under AUTOCOMMIT, where each statement
commits on its own, the keys are inserted unbound before the rows (so a
committed row always has its key) and bound by an UPDATE after.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import faults
from sa_envelope.envelope import ciphers
from support.paths import ROWS, assert_stored, read_back, rows_as_dicts, setup


def core_executemany(engine: Any, Item: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__), rows_as_dicts(with_id=False))


def orm_add_all(engine: Any, Item: Any) -> None:
    with Session(engine) as s:
        s.add_all([Item(**r) for r in rows_as_dicts(with_id=False)])
        s.commit()


def key_statements(engine: Engine, keys: Any) -> list[str]:
    """Every statement sent on ``engine`` that names the key table, as it runs."""
    seen: list[str] = []
    name = keys.table.name

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if name in statement:
            seen.append(statement.lstrip().split(None, 1)[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    return seen


def bound_wraps(engine: Engine, keys: Any) -> list[tuple[int, bool]]:
    """(wrap version byte, digest recorded) of every row key."""
    t = keys.table
    with engine.connect() as conn:
        rows = conn.execute(select(t.c.wrapped_key, t.c.row_digest).where(t.c.scope == "row")).all()
    return sorted((bytes(w)[0], d is not None) for w, d in rows)


@pytest.mark.parametrize("write", [core_executemany, orm_add_all], ids=["core_executemany", "orm_add_all"])
def test_keys_are_wrapped_once_bound_and_never_updated(engine: Engine, write: Callable[[Any, Any], None]) -> None:
    keys, Item = setup(engine, autoincrement=True)
    seen = key_statements(engine, keys)
    write(engine, Item)
    assert "UPDATE" not in seen  # no unbound key re-wrapped after the INSERT
    assert bound_wraps(engine, keys) == [(ciphers.ROW_WRAP_BOUND, True)] * len(ROWS)
    assert_stored(engine, keys, ROWS)
    assert read_back(engine, Item) == ROWS


@pytest.mark.parametrize("write", [core_executemany, orm_add_all], ids=["core_executemany", "orm_add_all"])
def test_under_autocommit_keys_are_stored_before_their_rows_then_bound(
    engine: Engine, write: Callable[[Any, Any], None]
) -> None:
    keys, Item = setup(engine, autoincrement=True)
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    seen = key_statements(engine, keys)
    write(auto, Item)
    inserts_then_update = [s for s in seen if s in ("INSERT", "COPY", "UPDATE")]
    assert inserts_then_update[-1] == "UPDATE" and "UPDATE" not in inserts_then_update[:-1]
    assert bound_wraps(engine, keys) == [(ciphers.ROW_WRAP_BOUND, True)] * len(ROWS)
    assert read_back(engine, Item) == ROWS


@pytest.mark.parametrize("write", [core_executemany, orm_add_all], ids=["core_executemany", "orm_add_all"])
def test_a_failure_between_the_rows_and_their_keys_rolls_both_back(
    engine: Engine, write: Callable[[Any, Any], None]
) -> None:
    keys, Item = setup(engine, autoincrement=True)

    def fail(name: str) -> None:
        if name == "rowkey.create.before_insert":
            raise RuntimeError(f"injected at {name}")

    with faults.inject(fail), pytest.raises(RuntimeError):
        write(engine, Item)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Item.__table__)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(keys.table)).scalar() <= 1  # the digest key at most
    write(engine, Item)  # and the same write then succeeds (PostgreSQL's sequence does not roll back: new ids)
    assert [r[1:] for r in read_back(engine, Item)] == [r[1:] for r in ROWS]


def core_multi_values(engine: Any, Item: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(Item.__table__).values(rows_as_dicts(with_id=False)))


@pytest.mark.parametrize("write", [core_executemany, core_multi_values], ids=["core_executemany", "core_multi_values"])
def test_rows_run_one_by_one_as_the_first_statement_still_roll_back_with_their_keys(
    engine: Engine, write: Callable[[Any, Any], None]
) -> None:
    """With the table key already stored, the INSERT is the transaction's
    first statement. On SQLite it runs one row per statement inside a
    savepoint (``rows.perrow``: lastrowid), and pysqlite opens no transaction
    before a SAVEPOINT, whose RELEASE then committed the rows on their own:
    a failure before their keys were inserted left rows no key opens."""
    keys, Item = setup(engine, autoincrement=True)
    write(engine, Item)  # the table key and the digest key are made and committed here
    t = Item.__table__
    with engine.begin() as conn:
        conn.execute(t.delete())
    with engine.connect() as conn:
        stored_keys = conn.execute(select(func.count()).select_from(keys.table)).scalar()

    def fail(name: str) -> None:
        if name == "rowkey.create.before_insert":
            raise RuntimeError(f"injected at {name}")

    with faults.inject(fail), pytest.raises(RuntimeError):
        write(engine, Item)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(t)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(keys.table)).scalar() == stored_keys
    write(engine, Item)
    assert [r[1:] for r in read_back(engine, Item)] == [r[1:] for r in ROWS]
