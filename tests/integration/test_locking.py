"""A batch the database rolls back to break a deadlock is run again
(``sa_envelope.locking``), on the real servers' own deadlock errors.

Two transactions lock two rows in opposite orders: PostgreSQL and MariaDB
each break the cycle by rolling one back (SQLSTATE 40P01, error 1213), the
loser is run again by :func:`retry_deadlocks` and both finish. A
search-index rebuild whose batch is rolled back by a deadlock (CI: two
``reencrypt --workers 2`` processes on MariaDB) starts that batch again
from the counts before it: the report equals that of a run with no
deadlock and every token is under the new key. Any other error is raised at
once.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from integration.test_cli_reindex import FAST, OWNER, _fill, _models
from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.keys import table as kt
from sa_envelope.locking import is_deadlock, read_committed, retry_deadlocks
from sa_envelope.search import verify


def _cycle_table(engine: Engine) -> Table:
    table = Table("locking_cycle", MetaData(), Column("id", Integer, primary_key=True), Column("n", Integer))
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "n": 0}, {"id": 2, "n": 0}])
    return table


@pytest.mark.backends("postgresql", "mysql")
def test_the_loser_of_a_real_deadlock_is_run_again_and_both_finish(engine: Engine) -> None:
    table = _cycle_table(engine)
    both = threading.Barrier(2, timeout=30)
    attempts = {1: 0, 2: 0}
    seen: list[BaseException] = []

    def cross(first: int, second: int) -> None:
        attempts[first] += 1
        try:
            with read_committed(engine) as conn, conn.begin():
                conn.execute(update(table).where(table.c.id == first).values(n=table.c.n + 1))
                if attempts[first] == 1:
                    both.wait()  # each holds its first row: the second lock closes the cycle
                conn.execute(update(table).where(table.c.id == second).values(n=table.c.n + 1))
        except DBAPIError as exc:
            seen.append(exc)
            raise

    errors: list[BaseException] = []

    def run(first: int, second: int) -> None:
        try:
            retry_deadlocks(lambda: cross(first, second))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=pair) for pair in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [], errors
    assert len(seen) >= 1 and all(is_deadlock(e) for e in seen), seen  # the database broke a real cycle
    assert sum(attempts.values()) == 2 + len(seen)  # each loss run again, once
    with engine.connect() as conn:
        assert dict(conn.execute(select(table.c.id, table.c.n)).all()) == {1: 2, 2: 2}  # every attempt that counted


def test_an_error_that_is_not_a_deadlock_is_raised_at_once(engine: Engine) -> None:
    table = _cycle_table(engine)
    calls = []

    def duplicate() -> None:
        calls.append(1)
        with engine.begin() as conn:
            conn.execute(table.insert().values(id=1, n=0))

    with pytest.raises(IntegrityError) as caught:
        retry_deadlocks(duplicate)
    assert calls == [1] and not is_deadlock(caught.value)


class _Deadlocks:
    """Wraps ``verify._check_batch`` or ``_check_arrays``: its ``n``-th call (mid-batch, after the
    batch counted its rows and before it writes) raises the error MariaDB
    sends for a deadlock, as its driver raises it."""

    def __init__(self, real: Any, n: int) -> None:
        self.real, self.n, self.calls = real, n, 0

    def __call__(self, conn: Any, index: Any, batch: Any, report: Any, fix: bool) -> None:
        self.calls += 1
        if self.calls == self.n:
            for _ in batch:
                report.rows += 1  # as the real check does before its writes
            import pymysql

            orig = pymysql.err.OperationalError(
                1213, "Deadlock found when trying to get lock; try restarting transaction"
            )
            raise DBAPIError.instance("DELETE ...", None, orig, pymysql.err.Error)
        self.real(conn, index, batch, report, fix)


def _rotated(engine: Engine, tmp_path: Any) -> tuple[KeyManager, Any]:
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"), live=FAST)
    keys.create_table()
    Patient, twin = _models(keys)
    Patient.metadata.create_all(engine)
    _fill(engine, Patient, twin)
    keys.rotate_table_key(OWNER, scope="blind-index")
    time.sleep(max(0.0, keys.live.switched_at(OWNER, kt.SCOPE_BLIND_INDEX) - time.time()))  # written under it
    return keys, Patient


def test_a_rebuild_batch_lost_to_a_deadlock_starts_again_from_its_counts(
    engine: Engine, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, Patient = _rotated(engine, tmp_path)
    plain = {r.index: r for r in verify.verify_index(engine, Patient.__table__)}  # nothing moved yet
    assert plain and all(sum(r.moving.values()) > 0 for r in plain.values()), [str(r) for r in plain.values()]

    faults = {name: _Deadlocks(getattr(verify, name), n=3) for name in ("_check_batch", "_check_arrays")}
    for name, fault in faults.items():  # token table (SQLite, MariaDB) and row arrays (PostgreSQL)
        monkeypatch.setattr(verify, name, fault)
    rebuilt = verify.rebuild(engine, Patient.__table__, batch_size=40)
    monkeypatch.undo()
    assert max(f.calls for f in faults.values()) > 3  # the lost batch was run again, then the rest

    def counts(r: Any) -> tuple[Any, ...]:
        return r.rows, r.moving, r.missing, r.tampered, r.orphan_tokens

    assert {r.index: counts(r) for r in rebuilt} == {name: counts(r) for name, r in plain.items()}
    after = keys.verify_index(Patient.__table__)
    assert all(r.ok and not r.moving for r in after), [str(r) for r in after]
