"""Issue 16: uniqueness guards are removed when the rotation that needed them
ends (the re-encryption job retires the old deterministic key), and removing
them never lets a writer through unlocked.

Guards are lock points that matter only while a column has two live keys.
The job deletes the table's guards in the transaction that retires the old
key, once one live key is left; another table's rotation keeps its own. On
MariaDB the missing guards are made on a connection of their own before they
are locked: a removal landing in between is made good (the lock loops until
every guard is locked), which a third connection sees with ``NOWAIT``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from sa_envelope import DuplicateValueError, EncryptedType, KeyManager, LivePolicy, LocalKeyProvider
from sa_envelope.columns.guardrows import guard_table, remove_guards
from sa_envelope.keys import table as kt
from support.rotation import key_statuses

pytestmark = pytest.mark.backends("postgresql", "mysql")
FAST = LivePolicy(ttl=0.2, grace=1.0)
GUARDS = guard_table(MetaData())


def _table(keys: KeyManager, name: str) -> Table:
    return Table(
        name, MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", EncryptedType(String(100), keys, deterministic=True), unique=True),
    )  # fmt: skip


def _rotated(
    engine: Engine, tmp_path: Path, names: tuple[str, ...]
) -> tuple[KeyManager, dict[str, Table], dict[str, int]]:
    """``names`` mid-rotation: rows 1-5 under the old key, writes now under the new one."""
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "k.key"), live=FAST)
    keys.create_table()
    tables = {n: _table(keys, n) for n in names}
    old: dict[str, int] = {}
    for name, table in tables.items():
        table.create(engine)
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": i, "email": f"u{i}@x"} for i in range(1, 6)])
        (old[name],) = key_statuses(engine, name, kt.SCOPE_DETERMINISTIC)
        keys.rotate_table_key(name, scope=kt.SCOPE_DETERMINISTIC)
    for name in names:
        time.sleep(max(0.0, keys.live.switched_at(name, kt.SCOPE_DETERMINISTIC) - time.time()))
    keys.live.invalidate()
    return keys, tables, old


def _guards(engine: Engine, owner: str) -> int:
    with engine.connect() as conn:
        stmt = select(func.count()).select_from(GUARDS).where(GUARDS.c.owner_table == owner)
        return int(conn.execute(stmt).scalar_one())


def test_a_finished_rotation_removes_its_guards(engine: Engine, tmp_path: Path) -> None:
    keys, tables, old = _rotated(engine, tmp_path, ("members", "visitors"))
    for table in tables.values():
        with engine.begin() as conn:  # checked writes: guard rows made
            conn.execute(table.insert(), [{"id": i, "email": f"u{i}@x"} for i in range(6, 9)])
        with pytest.raises(DuplicateValueError):
            with engine.begin() as conn:
                conn.execute(table.insert(), [{"id": 9, "email": "u1@x"}])
    assert _guards(engine, "members") > 0 and _guards(engine, "visitors") > 0

    report = keys.reencrypt([tables["members"].c.email], key_id=old["members"], batch_size=2)
    assert report.retired and report.remaining == 0
    assert key_statuses(engine, "members", kt.SCOPE_DETERMINISTIC)[old["members"]] == kt.RETIRED
    assert _guards(engine, "members") == 0
    assert _guards(engine, "visitors") > 0  # still rotating: its guards stay

    # one live key: nothing is locked or made, and the database's UNIQUE is exact again
    with engine.begin() as conn:
        conn.execute(tables["members"].insert(), [{"id": 20, "email": "new@x"}])
    assert _guards(engine, "members") == 0
    with pytest.raises(IntegrityError):
        with engine.begin() as conn:
            conn.execute(tables["members"].insert(), [{"id": 21, "email": "u1@x"}])


@pytest.mark.backends("mysql")
def test_guards_removed_between_made_and_locked_are_made_again(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """A remover (a retirement seen late by this writer) deletes the guards
    after the side connection has made them and before the writer's locking
    read: the writer makes them again and holds them all. (PostgreSQL's
    upsert inserts or locks each guard in one statement: no such window.)"""
    keys, tables, _ = _rotated(engine, tmp_path, ("members",))
    table = tables["members"]
    remover = create_engine(db_url)
    peer = create_engine(db_url)
    removed: list[int] = []

    def remove_before_the_locking_read(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if not removed and GUARDS.name in statement and "FOR UPDATE" in statement:
            with remover.begin() as other:
                removed.append(remove_guards(other, keys.table, "members"))

    event.listen(engine, "before_cursor_execute", remove_before_the_locking_read)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{"id": 30, "email": "fresh@x"}])
            assert removed == [2]  # fresh@x under two live keys, made, then removed
            with peer.connect() as third:  # the writer's transaction is open: its guards are locked
                third.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
                rows = select(GUARDS.c.guard).where(GUARDS.c.owner_table == "members")
                assert third.execute(rows).all() == []  # made again in the writer's transaction
                with pytest.raises(OperationalError):
                    third.execute(rows.with_for_update(nowait=True)).all()
                third.rollback()
        assert _guards(engine, "members") == 2
        with pytest.raises((DuplicateValueError, IntegrityError)):  # under the same key: the database's
            with engine.begin() as conn:
                conn.execute(table.insert(), [{"id": 31, "email": "fresh@x"}])
    finally:
        event.remove(engine, "before_cursor_execute", remove_before_the_locking_read)
        remover.dispose()
        peer.dispose()
