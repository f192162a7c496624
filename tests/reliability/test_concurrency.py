"""Concurrency: the first-key race, with threads and with processes.

Many writers start at once on a table that has no key yet, each with a
cold cache. Each one's transaction sees no committed key, so each may
create one: the key is inserted in the writer's own transaction and only
trusted once read back (see ``_manager.py``). The promises:

* no errors, every row readable afterwards by anyone;
* **the number of table keys created is bounded by the number of
  concurrent first writers** (at most one each), and **the deterministic
  key is one per table** (concurrent creators adopt the winner's); once the
  race is over every writer converges on the newest active key, so later
  writers create none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from reliability.crash import WORKER, CrashContext, worker_env
from reliability.rows import check_rows, count_key_rows, insert_rows
from sa_envelope import LocalKeyProvider
from support.models import schema

pytestmark = [pytest.mark.reliability, pytest.mark.backends("postgresql", "mysql")]

THREADS = 8
PROCESSES = 3
THREADS_PER_PROCESS = 2
ROWS = 40


def _assert_bounded(engine: Engine, table: str, writers: int) -> int:
    """At most one table key per writer, exactly one deterministic key
    (docs/threat-model.md, "Concurrent first writers"); returns the keys created."""
    created = 0
    for scope, bound in (("table", writers), ("deterministic", 1)):
        n = count_key_rows(engine, table, scope)
        assert 1 <= n <= bound, f"{n} {scope} keys for {writers} concurrent first writers"
        created += n
    return created


def _later_writers_create_none(engine: Engine, provider: Any, table: str, start: int) -> None:
    before = count_key_rows(engine, table)
    insert_rows(schema(engine, provider, [table]), table, range(start, start + ROWS))
    assert count_key_rows(engine, table) == before


def test_threads_race_for_the_first_key(engine: Engine, reliability: Any) -> None:
    provider = LocalKeyProvider(os.urandom(32))
    s = schema(engine, provider, ["patients"])
    s.create()
    start = threading.Barrier(THREADS + 2)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(t: int) -> None:
        try:
            start.wait()
            insert_rows(s, "patients", range(t * ROWS, (t + 1) * ROWS))
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:  # reads committed rows while the race goes on
        # Each check makes a fresh KeyManager (a cold cache), which adds event
        # listeners to the engine it is given; SQLAlchemy does not let listeners
        # be added to an engine other threads are executing on, so the reader
        # reads the same database through an engine of its own.
        own = create_engine(engine.url)
        try:
            start.wait()
            while not done.is_set():
                checked, wrong = check_rows(own, provider, "patients")
                assert wrong == 0, f"{wrong} of {checked} rows read wrong during the race"
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    writers = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in writers + readers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert not errors, [repr(e) for e in errors]
    total = THREADS * ROWS
    assert check_rows(engine, provider, "patients", range(total)) == (total, 0)
    keys = _assert_bounded(engine, "patients", THREADS)
    _later_writers_create_none(engine, provider, "patients", total)
    reliability.race(THREADS, keys)
    reliability.rows(total)


def test_processes_race_for_the_first_key(db_url: str, engine: Engine, tmp_path: Path, reliability: Any) -> None:
    ctx = CrashContext(db_url, str(tmp_path / "master.key"))
    ctx.schema().create()
    args = ["--url", db_url, "--keyfile", ctx.keyfile, "race"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", WORKER, *args, str(w), str(ROWS), str(THREADS_PER_PROCESS)],
            env=worker_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(PROCESSES)
    ]
    try:
        for proc in procs:  # all imported and connected: start together
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0] * PROCESSES, [err for _, err in results]
    writers = PROCESSES * THREADS_PER_PROCESS
    total = writers * ROWS
    try:
        assert check_rows(engine, ctx.provider, "patients", range(total)) == (total, 0)
        keys = _assert_bounded(engine, "patients", writers)
        _later_writers_create_none(engine, ctx.provider, "patients", total)
    finally:
        ctx.dispose()
    reliability.race(writers, keys)
    reliability.rows(total)
