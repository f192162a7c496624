"""UNIQUE across the live keys of a deterministic column, under a real race.

Two application "processes" (two KeyManagers, each with its own engine and
connections) write during a rotation: one has switched to the new key (its
grace is short), the other still writes under the old one (a long grace).
Both know both keys, so both check. Each waits after its INSERT, before its
uniqueness check, for the other's INSERT (3 s at most): without a lock that
makes the later writer wait for the earlier transaction, both INSERTs run,
then both checks, neither sees the other's uncommitted row, and the value is
stored twice. With the guard rows (columns/uniqueness.py) exactly one of
them is refused.

An UPDATE that moves a row onto a taken tuple without writing the
deterministic column (test_an_update_...) races an INSERT the same way. On
MariaDB that race was closed before (the INSERT's locking read waits for the
UPDATE's uncommitted index entry), but the UPDATE itself went unchecked:
test_unique_update.py is the test that fails there without the fix.

SQLite is not raced: it has one writer, the second INSERT waits for the first
transaction's end (the sequential checks are in test_rotation_live.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, UniqueConstraint, create_engine
from sqlalchemy import func, select, type_coerce
from sqlalchemy.engine import Engine

from sa_envelope import DuplicateValueError, EncryptedType, KeyManager, LivePolicy, LocalKeyProvider
from sa_envelope.columns import uniqueness
from sa_envelope.columns.guardrows import guard_table
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt

pytestmark = pytest.mark.backends("postgresql", "mysql")

SWITCHED = LivePolicy(ttl=0.2, grace=1.0)  # writes under the new key a second after the rotation
BEHIND = LivePolicy(ttl=0.2, grace=3600.0)  # matches both keys, still writes under the old one


def _accounts(keys: KeyManager) -> Table:
    return Table(
        "accounts", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("email", EncryptedType(String(100), keys, deterministic=True), unique=True),
        Column("tenant", String(20)),
        Column("handle", EncryptedType(String(40), keys, deterministic=True)),
        UniqueConstraint("tenant", "handle"),
    )  # fmt: skip


class Apps:
    """The two processes, mid-rotation: ``switched`` writes under the new key, ``behind`` under the old."""

    def __init__(self, engine: Engine, db_url: str, tmp_path: Path) -> None:
        key_file = tmp_path / "master.key"
        self.switched = KeyManager(engine, LocalKeyProvider.from_file(key_file), live=SWITCHED)
        self.switched.create_table()
        self.other = create_engine(db_url)
        self.behind = KeyManager(self.other, LocalKeyProvider.from_file(key_file), live=BEHIND)
        self.tables = {"switched": _accounts(self.switched), "behind": _accounts(self.behind)}
        self.engines = {"switched": engine, "behind": self.other}
        self.tables["switched"].create(engine)
        with engine.begin() as conn:  # the table's first deterministic key
            conn.execute(self.tables["switched"].insert(), [{"id": 1, "email": "a@x", "tenant": "t0", "handle": "h"}])
        self.old = self.key("switched", 1, "email")
        self.new = self.switched.rotate_table_key("accounts", scope=kt.SCOPE_DETERMINISTIC)
        time.sleep(max(0.0, self.switched.live.switched_at("accounts", kt.SCOPE_DETERMINISTIC) - time.time()))
        self.switched.live.invalidate("accounts")
        assert self.switched.live.write_key("accounts", kt.SCOPE_DETERMINISTIC).key_id == self.new
        assert self.behind.live.write_key("accounts", kt.SCOPE_DETERMINISTIC).key_id == self.old
        assert len(self.behind.live.keys("accounts", kt.SCOPE_DETERMINISTIC)) == 2

    def key(self, app: str, row_id: int, column: str) -> int:
        table = self.tables[app]
        with self.engines[app].connect() as conn:
            raw = conn.execute(select(type_coerce(table.c[column], LargeBinary)).where(table.c.id == row_id)).scalar()
        return fmt.key_id_of(bytes(raw))

    def race(self, rows: dict[str, Any], constraint: str, monkeypatch: Any) -> dict[str, Any]:
        """Each app inserts its row (or runs its statement: a callable of the
        connection and the app's table) in a transaction of its own. After its INSERT,
        each waits (up to 3 s) for the other's INSERT before it checks
        ``constraint`` (the unique set holding that column): without a lock
        taken before the INSERT, both INSERTs run, then both checks, before
        either commits. With it, the later writer waits for the earlier
        transaction's end before its INSERT, and the earlier one checks alone."""
        self.arrived = arrived = {app: threading.Event() for app in rows}
        self.finished = {app: threading.Event() for app in rows}
        outcome: dict[str, BaseException | None] = {}
        check = uniqueness._check_set
        mine = threading.local()

        def held(conn: Any, columns: tuple[Any, ...], *args: Any) -> None:
            if constraint in [c.name for c in columns]:
                arrived[mine.app].set()
                (other,) = set(arrived) - {mine.app}
                arrived[other].wait(timeout=3)
            check(conn, columns, *args)

        def write(app: str) -> None:
            mine.app = app
            try:
                with self.engines[app].begin() as conn:
                    if callable(rows[app]):
                        rows[app](conn, self.tables[app])
                    else:
                        conn.execute(self.tables[app].insert(), [rows[app]])
                outcome[app] = None
            except BaseException as exc:  # noqa: BLE001 - the outcome is the test's
                outcome[app] = exc
            finally:
                self.finished[app].set()

        threads = [threading.Thread(target=write, args=(app,)) for app in rows]
        with monkeypatch.context() as patch:
            patch.setattr(uniqueness, "_check_set", held)
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        return outcome

    def count(self, **where: str) -> int:
        table = self.tables["switched"]
        with self.engines["switched"].connect() as conn:
            stmt = select(func.count()).select_from(table)
            for name, value in where.items():
                stmt = stmt.where(table.c[name] == value)
            return int(conn.execute(stmt).scalar_one())

    def close(self) -> None:
        self.other.dispose()


def _one_refused(outcome: dict[str, BaseException | None]) -> None:
    errors = [e for e in outcome.values() if e is not None]
    assert len(outcome) == 2 and len(errors) == 1, outcome
    assert isinstance(errors[0], DuplicateValueError), repr(errors[0])
    assert errors[0].table == "accounts"


def test_two_writers_of_one_value_under_two_keys_race_and_one_is_refused(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps = Apps(engine, db_url, tmp_path)
    try:
        outcome = apps.race({
            "switched": {"id": 10, "email": "same@x", "tenant": "t1", "handle": "a"},
            "behind": {"id": 11, "email": "same@x", "tenant": "t2", "handle": "b"},
        }, "email", monkeypatch)  # fmt: skip
        _one_refused(outcome)
        assert "same@x" not in str([e for e in outcome.values() if e][0])
        assert apps.count(email="same@x") == 1  # matched under both keys: stored once
        (kept,) = [app for app, e in outcome.items() if e is None]
        assert apps.key(kept, 10 if kept == "switched" else 11, "email") == (
            apps.new if kept == "switched" else apps.old
        )
        with engine.connect() as conn:  # the lock rows: digests, no value
            guards = conn.execute(select(guard_table(MetaData()).c.guard)).scalars().all()
        assert guards and all(len(g) == 64 for g in guards)

        # different values never wait for each other, and both pass
        outcome = apps.race({
            "switched": {"id": 20, "email": "one@x", "tenant": "t1", "handle": "c"},
            "behind": {"id": 21, "email": "two@x", "tenant": "t2", "handle": "d"},
        }, "email", monkeypatch)  # fmt: skip
        assert outcome == {"switched": None, "behind": None}
    finally:
        apps.close()


def test_a_multi_column_unique_constraint_is_checked_as_a_tuple_across_keys(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps = Apps(engine, db_url, tmp_path)
    try:
        outcome = apps.race({
            "switched": {"id": 30, "email": "p@x", "tenant": "t1", "handle": "bob"},
            "behind": {"id": 31, "email": "q@x", "tenant": "t1", "handle": "bob"},
        }, "handle", monkeypatch)  # fmt: skip
        _one_refused(outcome)
        assert apps.count(tenant="t1", handle="bob") == 1

        # the same handle in another tenant is another tuple: allowed, under either key
        with apps.engines["behind"].begin() as conn:
            conn.execute(apps.tables["behind"].insert(), [{"id": 32, "email": "r@x", "tenant": "t2", "handle": "bob"}])
        assert apps.key("behind", 32, "handle") == apps.old
        assert apps.count(handle="bob") == 2

        # and a later duplicate of the whole tuple under the other key is refused too
        writer = "behind" if outcome["switched"] is None else "switched"
        with pytest.raises(DuplicateValueError) as refused:
            with apps.engines[writer].begin() as conn:
                conn.execute(apps.tables[writer].insert(),
                             [{"id": 33, "email": "s@x", "tenant": "t1", "handle": "bob"}])  # fmt: skip
        assert "tenant, handle" in str(refused.value) and "bob" not in str(refused.value)
    finally:
        apps.close()


def test_an_update_of_the_other_column_races_an_insert_and_one_is_refused(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UPDATE writes no handle: it locks the guards of the handle its row
    keeps (read before the write), the same ones the INSERT of that handle locks."""
    apps = Apps(engine, db_url, tmp_path)
    try:
        with apps.engines["switched"].begin() as conn:  # (t6, eve) under the new key
            conn.execute(
                apps.tables["switched"].insert(), [{"id": 41, "email": "e@x", "tenant": "t6", "handle": "eve"}]
            )
        assert apps.key("switched", 41, "handle") == apps.new

        def move(conn: Any, table: Table) -> None:
            conn.execute(table.update().where(table.c.id == 41).values(tenant="t7"))
            # commit after the INSERT's transaction ends, unless that waits for us (then it never arrives)
            if apps.arrived["behind"].wait(timeout=3):
                apps.finished["behind"].wait(timeout=10)

        outcome = apps.race({
            "switched": move,  # (t6, eve) -> (t7, eve), the handle stays under the new key
            "behind": {"id": 42, "email": "f@x", "tenant": "t7", "handle": "eve"},  # under the old key
        }, "handle", monkeypatch)  # fmt: skip
        _one_refused(outcome)
        assert apps.count(tenant="t7", handle="eve") == 1
        assert "eve" not in str([e for e in outcome.values() if e][0])
    finally:
        apps.close()
