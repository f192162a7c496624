"""Re-encryption across processes: a second process with a stale cache keeps
matching while the parent rotates the deterministic key of a column and
re-encrypts it; and ``sa-envelope reencrypt --workers 2`` runs two worker
processes that never write a row twice, fail together when one is killed,
and leave a rerun to finish.

The child (reliability/stale_reader.py, a real subprocess with its own
KeyManager) warms its caches on the old key, then keeps reading and writing
through the whole rotation. Neither process ever misses a value the other
wrote: before the switch both write under the old key and match both; after
it both write under the new one and match both until the old key is retired.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, func, select, text, type_coerce
from sqlalchemy.engine import Engine

from reliability.crash import worker_env
from reliability.stale_reader import POLICY, people
from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support.rotation import PYTHON, ROOT, stored_hash, subprocess_env, worker_processes


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


# -- the CLI's worker processes -------------------------------------------------------------------

ROWS = 4000
AUDIT = {  # every UPDATE of a row, with the database session that made it (in the writer's transaction)
    "postgresql": [
        "CREATE TABLE audit (id INTEGER NOT NULL, who INTEGER NOT NULL)",
        "CREATE OR REPLACE FUNCTION audit_notes() RETURNS trigger AS $$ BEGIN "
        "INSERT INTO audit VALUES (NEW.id, pg_backend_pid()); RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER notes_audit AFTER UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION audit_notes()",
    ],
    "mysql": [
        "CREATE TABLE audit (id INTEGER NOT NULL, who INTEGER NOT NULL)",
        "CREATE TRIGGER notes_audit AFTER UPDATE ON notes FOR EACH ROW INSERT INTO audit VALUES (NEW.id, CONNECTION_ID())",
    ],
}


def _reencrypt(db_url: str, keyfile: Path, key_id: int, *extra: str) -> subprocess.Popen[str]:
    args = ["reencrypt", "--database-url", db_url, "--cmk", f"local:{keyfile}", "--key", fmt.format_key_id(key_id),
            "--batch-size", "50", "--json", *extra]  # fmt: skip
    return subprocess.Popen([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _moved(engine: Engine, table: Any, key_id: int) -> int:
    with engine.connect() as conn:
        raw = conn.execute(select(type_coerce(table.c.body, LargeBinary))).scalars().all()
    return sum(1 for r in raw if fmt.read_header(bytes(r))[1] != key_id)


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("kill", [False, True], ids=["two-processes", "sigkill-one"])
def test_reencrypt_by_two_worker_processes(db_url: str, engine: Engine, tmp_path: Path, kill: bool) -> None:
    """``reencrypt --workers 2``: two processes, each row written once (a trigger
    logs every UPDATE with its session); SIGKILL of one fails the command in
    one line, and a rerun finishes; a rerun after completion changes nothing
    and calls no KMS."""
    keyfile = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
    keys.create_table()
    table = Table("notes", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("body", EncryptedType(String(50), keys)))  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(1, ROWS + 1)])
        for statement in AUDIT[engine.dialect.name]:
            conn.execute(text(statement))
    old = _key_of_body(engine, table, 1)

    # kill: slow enough (10 s a worker at full speed) that both workers are caught mid-job on a loaded machine
    proc = _reencrypt(db_url, keyfile, old, "--workers", "2", "--rate", "400" if kill else "2500")
    if kill:
        deadline = time.monotonic() + 120
        while not (0 < _moved(engine, table, old) < ROWS // 2 and len(worker_processes(proc.pid)) == 2):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        victims = worker_processes(proc.pid)
        assert len(victims) == 2, victims
        os.kill(victims[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    if kill:
        assert proc.returncode == 1, (out, err)
        assert re.fullmatch(rf"sa-envelope: error: worker [12] of 2 \(pid {victims[0]}\) was killed by signal 9 "
                            r"before it finished", err.strip()), err  # fmt: skip
        assert _moved(engine, table, old) < ROWS  # the other worker was stopped too
        proc = _reencrypt(db_url, keyfile, old, "--workers", "2")
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert (report["remaining"], report["failed"]) == (0, 0)
    assert report["kms_calls"] <= 1 + 2 * 2  # the new key made, two keys per worker process: not per row
    with engine.connect() as conn:
        writes = conn.execute(text("SELECT id, COUNT(*) FROM audit GROUP BY id")).all()
        sessions = conn.execute(text("SELECT COUNT(DISTINCT who) FROM audit")).scalar_one()
        bodies = dict(conn.execute(select(table.c.id, table.c.body)).all())
    assert {i: n for i, n in writes if n != 1} == {}  # no row written twice, even across the kill
    assert len(writes) == ROWS and _moved(engine, table, old) == ROWS
    assert bodies == {i: f"note {i}" for i in range(1, ROWS + 1)}
    if not kill:
        assert report["reencrypted"] == ROWS
        assert sessions == 2  # both processes wrote

    before = stored_hash(engine)
    again = _reencrypt(db_url, keyfile, old, "--workers", "2")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert (json.loads(out)["reencrypted"], json.loads(out)["kms_calls"]) == (0, 0)
    assert stored_hash(engine) == before


def _key_of_body(engine: Engine, table: Any, row_id: int) -> int:
    with engine.connect() as conn:
        raw = conn.execute(select(type_coerce(table.c.body, LargeBinary)).where(table.c.id == row_id)).scalar_one()
    return fmt.read_header(bytes(raw))[1]


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("to", ["group", "command"], ids=["ctrl-c", "sigint-to-the-command"])
def test_ctrl_c_stops_every_worker_process(db_url: str, engine: Engine, tmp_path: Path, to: str) -> None:
    """Ctrl-C (SIGINT to the terminal's process group, or to the command
    alone, which passes it on): every worker stops, one line, exit 130; a
    rerun finishes the job."""
    keyfile = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
    keys.create_table()
    table = Table("notes", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("body", EncryptedType(String(50), keys)))  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(1, ROWS + 1)])
    old = _key_of_body(engine, table, 1)
    args = ["reencrypt", "--database-url", db_url, "--cmk", f"local:{keyfile}", "--key", fmt.format_key_id(old),
            "--batch-size", "50", "--workers", "2", "--rate", "100"]  # fmt: skip
    # --rate 100: 40 s a worker, so a worker that starts seconds after the other (a loaded machine) still
    # finds it running; the signal goes as soon as both run and one row moved
    proc = subprocess.Popen([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while to == "early" and len(worker_processes(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)  # the workers exist and are still importing: nothing moved yet
    while to != "early" and not (_moved(engine, table, old) and len(worker_processes(proc.pid)) == 2):
        assert time.monotonic() < deadline and proc.poll() is None, ("the workers never ran together",
                                                                     proc.communicate())  # fmt: skip
        time.sleep(0.02)
    workers = worker_processes(proc.pid)
    assert len(workers) == 2 and proc.poll() is None
    if to in ("group", "early"):
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines() == ["sa-envelope: interrupted: every batch committed so far is kept: run the "
                                        "same command again to resume where it stopped"], err  # fmt: skip
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # none left running
    assert _moved(engine, table, old) < ROWS
    rerun = _reencrypt(db_url, keyfile, old, "--workers", "2")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and json.loads(out)["remaining"] == 0, err
    with engine.connect() as conn:
        assert dict(conn.execute(select(table.c.id, table.c.body)).all()) == {
            i: f"note {i}" for i in range(1, ROWS + 1)}  # fmt: skip


HELD = ROOT / "tests" / "support" / "cli_spawn_held.py"
INTERRUPTED = ("sa-envelope: interrupted: every batch committed so far is kept: run the same command again to resume "
               "where it stopped")  # fmt: skip


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("to", ["group", "command", "worker"], ids=["ctrl-c", "sigint-to-the-command", "to-the-worker"])
def test_sigint_while_workers_start(db_url: str, engine: Engine, tmp_path: Path, to: str) -> None:
    """A Ctrl-C that arrives while the parent is starting a worker (SIGINT held
    in the parent for the spawn) is not lost: the command stops before it
    starts the second worker, in one line, exit 130, no worker left. A SIGINT
    sent to the worker being started alone waits (the worker starts with it
    blocked) and stops that worker quietly: the command fails in one line
    naming it, no traceback. Either way a rerun finishes the job. The command
    is held in the window by support/cli_spawn_held.py, not by timing."""
    keyfile = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
    keys.create_table()
    table = Table("notes", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("body", EncryptedType(String(50), keys)))  # fmt: skip
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "body": f"note {i}"} for i in range(1, ROWS + 1)])
    old = _key_of_body(engine, table, 1)
    log = tmp_path / "spawned"
    args = ["reencrypt", "--database-url", db_url, "--cmk", f"local:{keyfile}", "--key", fmt.format_key_id(old),
            "--batch-size", "50", "--workers", "2", "--rate", "1000"]  # fmt: skip
    mode = "child" if to == "worker" else "hold"
    proc = subprocess.Popen([PYTHON, str(HELD), mode, str(log), *args], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while to != "worker" and not (log.exists() and log.read_text().endswith("\n")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)  # the first worker is launched: the parent is inside its start window now
    if to == "group":
        os.killpg(proc.pid, signal.SIGINT)  # the parent and the worker it is starting, as a terminal does
    elif to == "command":
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    spawned = [int(pid) for pid in log.read_text().split()]
    if to == "worker":
        assert proc.returncode == 1, (out, err)
        assert re.fullmatch(rf"sa-envelope: error: worker 1 of 2 \(pid {spawned[0]}\) exited with status 130 "
                            r"before it finished", err.strip()), err  # fmt: skip
    else:
        assert proc.returncode == 130, (out, err)
        assert err.strip().splitlines() == [INTERRUPTED], err
        assert len(spawned) == 1, spawned  # stopped in the window: the second worker never started
    assert not any(Path(f"/proc/{pid}").exists() for pid in spawned)  # none left running
    assert _moved(engine, table, old) < ROWS
    rerun = _reencrypt(db_url, keyfile, old, "--workers", "2")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and json.loads(out)["remaining"] == 0, err
    with engine.connect() as conn:
        assert dict(conn.execute(select(table.c.id, table.c.body)).all()) == {
            i: f"note {i}" for i in range(1, ROWS + 1)}  # fmt: skip
