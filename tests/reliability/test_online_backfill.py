"""Encrypting a column online under load: the backfill (``encrypt-column
--workers 2``: two worker processes) runs while application threads insert,
update, delete and read the same rows; one variant SIGKILLs one worker
process half way (the command fails in one line, its other worker stopped)
and finishes with a rerun.

Promises: every row ends with the value of its last logged write, in both
halves, encrypted; no row is missing or duplicated; no read made during the
backfill returned anything but the row's current value; the workers'
finished ranges add up to the job's (no range done twice); a rerun after
completion writes nothing and calls no KMS.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.jobs.claims import Claims, claims_table
from support.online import migrating_users, raw_users, stored
from support.rotation import PYTHON, ROOT, subprocess_env, worker_processes

pytestmark = pytest.mark.reliability

ROWS = 3000
WRITERS = 3  # thread t owns the rows with id % 4 == t; rows with id % 4 == 3 are only read
OPS = 400  # at most, per writer: they write until the backfill is done
DELETED = object()
JOB = "encrypt-column:users.email"


def original(i: int) -> str | None:
    return f"user{i}@example.org" if i % 11 else None


def worker(db_url: str, key_file: Path, *extra: str, scope: str = "table") -> subprocess.Popen[str]:
    kind = ["--deterministic"] if scope == "table" else ["--scope", "row"]  # row scope: keys made per row
    args = ["encrypt-column", "--url", db_url, "--table", "users", "--column", "email", *kind,
            "--cmk", f"local:{key_file}", "--batch", "200", "--chunk", "400", "--lease", "2", *extra]  # fmt: skip
    return subprocess.Popen([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finished(proc: subprocess.Popen[str]) -> tuple[int, int, int, int, str]:
    """(rows written, conceded, ranges finished, KMS calls, the report) a command printed."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    found = re.search(r": (\d+) rows written, (\d+) conceded to concurrent writes, (\d+) ranges finished", out)
    calls = re.search(r"KMS calls: (\d+)", out)
    assert found and calls, out
    print(out)
    return int(found[1]), int(found[2]), int(found[3]), int(calls[1]), out


class App:
    """Writer threads with a log of their writes, and a reader of the rows nobody writes."""

    def __init__(self, engine: Engine, keys: KeyManager, scope: str) -> None:
        self.engine, self.User, self.queryable = engine, migrating_users(keys, scope=scope), scope == "table"
        self.log: dict[int, Any] = {i: original(i) for i in range(1, ROWS + 1)}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.reads = self.writes = 0

    def check(self, session: Session, i: int) -> None:
        """A read of a row this thread alone writes must show its last write."""
        session.expire_all()
        got = session.get(self.User, i)
        want = self.log[i]
        value = DELETED if got is None else got.email
        if value is not want and value != want:
            self.failures.append(f"row {i}: read {value!r}, last write {want!r}")
        if want is not DELETED and want is not None and self.queryable:
            hits = session.scalars(select(self.User.id).where(self.User.email == want)).all()
            if hits != [i]:
                self.failures.append(f"row {i}: == matched {hits}")
        self.reads += 1

    def write(self, t: int) -> None:
        rng = random.Random(t)
        owned = [i for i in range(1, ROWS + 1) if i % 4 == t]
        next_id = ROWS + 1 + t
        try:
            with Session(self.engine) as session:
                for k in range(OPS):
                    if self.stop.is_set():
                        return
                    kind, i = rng.random(), rng.choice(owned)
                    value = f"t{t}-{k}@example.org" if k % 10 else None
                    if kind < 0.15:  # insert a new row (dual-written: it needs no backfill)
                        i, next_id = next_id, next_id + 4
                        session.add(self.User(id=i, email=value))
                        owned.append(i)
                    elif kind < 0.25 and self.log[i] is not DELETED:
                        session.delete(session.get(self.User, i))
                        value = DELETED
                    elif kind < 0.6 and self.log[i] is not DELETED:  # Core, one half given
                        session.execute(
                            update(self.User.__table__)
                            .where(self.User.__table__.c.id == i)
                            .values(email__encrypted=value)
                        )
                    elif self.log[i] is not DELETED:
                        session.get(self.User, i).email = value
                    else:
                        continue
                    session.commit()
                    self.log[i] = value
                    self.writes += 1
                    self.check(session, i)
                    time.sleep(0.002)  # spread the writes over the backfill
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.failures.append(f"writer {t}: {type(exc).__name__}: {exc}")

    def read(self) -> None:
        rng = random.Random(99)
        untouched = [i for i in range(1, ROWS + 1) if i % 4 == 3]
        with Session(self.engine) as session:
            while not self.stop.is_set():
                self.check(session, rng.choice(untouched))
                session.commit()  # a read transaction at a time, as a request would

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.write, args=(t,)) for t in range(WRITERS)]
        threads.append(threading.Thread(target=self.read))
        for thread in threads:
            thread.start()
        return threads


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize(
    ("kill", "scope"),
    [(False, "table"), (True, "table"), (True, "row")],
    ids=["two-workers", "sigkill-one", "row-scope-sigkill-one"],
)
def test_online_encrypt_under_load(db_url: str, tmp_path: Path, kill: bool, scope: str, reliability: Any) -> None:
    key_file = tmp_path / "master.key"
    engine = create_engine(db_url, pool_size=10)
    try:
        keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
        keys.create_table()
        raw = raw_users()
        raw.create(engine)
        with engine.begin() as conn:  # rows from before the dual-writing release: plaintext only
            conn.execute(insert(raw), [{"id": i, "email": original(i)} for i in range(1, ROWS + 1)])
        app = App(engine, keys, scope)
        with Session(engine) as session:  # the release has written before: its keys exist
            session.get(app.User, 1).email = app.log[1] = "first@example.org"
            session.commit()
        Claims(engine, JOB).create()  # watched below before a worker makes it
        command = worker(db_url, key_file, "--rate", "1000", "--workers", "2", scope=scope)  # two worker processes
        _wait_for(engine, lambda done: len(done) > 0)  # the backfill has begun
        threads = app.start()
        if kill:
            _wait_for(engine, lambda done: sum(done) * 3 >= len(done))
            victims = worker_processes(command.pid)
            assert len(victims) == 2, "the workers ended before one could be killed"
            os.kill(victims[0], signal.SIGKILL)  # mid-job: in a batch, or between two
            out, err = command.communicate(timeout=120)
            assert command.returncode == 1, (out, err)  # the other worker was stopped, in one line:
            assert re.fullmatch(rf"sa-envelope: error: worker [12] of 2 \(pid {victims[0]}\) was killed by "
                                r"signal 9 before it finished", err.strip()), err  # fmt: skip
            command = worker(db_url, key_file, "--rate", "1000", "--workers", "2", scope=scope)  # the rerun, still under load
        reports = [finished(command)]
        during = app.writes
        app.stop.set()
        for thread in threads:
            thread.join(timeout=600)
        assert app.failures == []
        assert during > 0  # the premise: the application wrote while the backfill ran

        final = stored(engine, KeyManager(engine, LocalKeyProvider.from_file(key_file)), scope=scope)
        alive = {i: v for i, v in app.log.items() if v is not DELETED}
        assert set(final) == set(alive)  # none missing, none resurrected (ids are the primary key)
        assert {i: plain for i, (plain, _) in final.items()} == alive
        assert {i: enc for i, (_, enc) in final.items()} == alive  # every value encrypted, and right
        with engine.connect() as conn:
            claims = claims_table(raw.metadata)
            ranges = conn.execute(select(func.count()).select_from(claims).where(claims.c.job == JOB)).scalar_one()
        assert Claims(engine, JOB).pending() == (0, 0)
        if not kill:
            assert sum(r[2] for r in reports) == ranges  # each range finished once, by one worker
            assert re.search(r"ranges finished by 2 workers", reports[0][4])  # both processes took some
        rerun = finished(worker(db_url, key_file, "--workers", "2", scope=scope))
        assert rerun[:4] == (0, 0, 0, 0)  # nothing written, no KMS call
        if scope == "row":  # each value is under the key bound to its own row: shredding the row erases it
            some = [i for i in sorted(alive) if alive[i] is not None][:: max(1, len(alive) // 5)][:5]
            for i in some:
                keys.shred_row("users", i)
            after = stored(engine, KeyManager(engine, LocalKeyProvider.from_file(key_file)), scope=scope)
            assert [after[i][1] for i in some] == [None] * len(some)
            assert all(after[i][1] == alive[i] for i in alive if i not in some)
        reliability.rows(len(final))
        if kill:
            reliability.crash("SIGKILL of a backfill worker under load")
    finally:
        engine.dispose()


def _wait_for(engine: Engine, ready: Any) -> None:
    """Until ``ready(done flags of the job's ranges)``."""
    claims = claims_table(raw_users().metadata)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            done = conn.execute(select(claims.c.done).where(claims.c.job == JOB)).scalars().all()
        if ready(done):
            return
        time.sleep(0.02)
    raise AssertionError("the backfill did not get there in 300 s")
