"""A second process with a stale cache keeps matching while the parent rotates
the deterministic key of a column and re-encrypts it.

The child (reliability/stale_reader.py, a real subprocess with its own
KeyManager) warms its caches on the old key, then keeps reading and writing
through the whole rotation. Neither process ever misses a value the other
wrote: before the switch both write under the old key and match both; after
it both write under the new one and match both until the old key is retired.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import LargeBinary, func, select, type_coerce
from sqlalchemy.engine import Engine

from reliability.crash import worker_env
from reliability.stale_reader import POLICY, people
from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt


class Child:
    def __init__(self, db_url: str, keyfile: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reliability.stale_reader", "--url", db_url, "--keyfile", str(keyfile)],
            env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.ask(None) == "ready", self.error()

    def ask(self, command: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def count(self, city: str) -> int:
        answer = self.ask(f"count {city}")
        assert answer.isdigit(), self.error()
        return int(answer)

    def insert(self, row_id: int, city: str) -> None:
        assert self.ask(f"insert {row_id} {city}") == "ok", self.error()

    def error(self) -> str:
        if self.proc.poll() is None:
            return "(child still running)"
        return self.proc.stderr.read() if self.proc.stderr else ""

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _key_of(engine: Engine, table: Any, row_id: int) -> int:
    with engine.connect() as conn:
        raw = conn.execute(select(type_coerce(table.c.city, LargeBinary)).where(table.c.id == row_id)).scalar_one()
    return fmt.read_header(bytes(raw))[1]


def _count(engine: Engine, table: Any, city: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(table.c.city == city)).scalar_one())


def test_stale_process_keeps_matching_through_a_rotation(db_url: str, engine: Engine, tmp_path: Path) -> None:
    keyfile = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile), live=POLICY)
    keys.create_table()
    table = people(keys)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "city": f"c{i % 5}"} for i in range(1, 51)])
    old = _key_of(engine, table, 1)
    child = Child(db_url, keyfile)
    try:
        assert child.count("c1") == 10  # the child has the old key cached now
        new = keys.rotate_table_key("people", scope=kt.SCOPE_DETERMINISTIC)

        child.insert(101, "c1")  # pending: everyone still writes under the old key
        assert _key_of(engine, table, 101) == old
        assert _count(engine, table, "c1") == child.count("c1") == 11

        time.sleep(max(0.0, keys.live.switched_at("people", kt.SCOPE_DETERMINISTIC) - time.time()))
        with engine.begin() as conn:  # the parent writes under the new key ...
            conn.execute(table.insert(), [{"id": 102, "city": "c2"}, {"id": 103, "city": "new"}])
        assert _key_of(engine, table, 102) == new
        assert child.count("c2") == 11 and child.count("new") == 1  # ... and the child finds it
        child.insert(104, "c3")
        assert _key_of(engine, table, 104) == new  # the child switched too
        assert _count(engine, table, "c3") == child.count("c3") == 11

        report = keys.reencrypt([table.c.city], key_id=old, batch_size=7, max_batches=3)
        assert report.stopped
        for city, expected in {"c0": 10, "c1": 11, "c2": 11, "c3": 11, "c4": 10, "new": 1}.items():
            assert child.count(city) == _count(engine, table, city) == expected, city

        report = keys.reencrypt([table.c.city], key_id=old, batch_size=7)
        assert report.retired and report.remaining == 0
        for city, expected in {"c0": 10, "c1": 11, "c2": 11, "c3": 11, "c4": 10, "new": 1}.items():
            assert child.count(city) == _count(engine, table, city) == expected, city
        child.insert(105, "c4")
        assert _key_of(engine, table, 105) == new
        assert _count(engine, table, "c4") == 11
    finally:
        child.close()
