"""``sa-envelope reencrypt --key <blind-index key> --index ... --workers 2``: two
worker processes (real subprocesses, PostgreSQL and MariaDB).

Each worker declares the table's indexes from the same ``--index`` specs and
moves its share of the rows (``id % 2``): the digests of the
``BlindIndexType`` column and the tokens of the prefix, substring and range
indexes. The parent alone rotates and waits for the switch before them, and
counts and retires the key after them. The command's process tree is
watched while it runs (threads of one process would show no worker
process), and a trigger logs every UPDATE of the table with the database
session that made it: each row written once, by two sessions.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from integration.test_cli_reindex import FAST, OWNER, SPECS, _assert_like_twin, _blind_key, _fill, _models
from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.keys import table as kt
from support.rotation import PYTHON, key_statuses, stored_hash, subprocess_env, worker_processes

AUDIT = {  # every UPDATE of a row, with the database session that made it (in the writer's transaction)
    "postgresql": [
        "CREATE TABLE reindex_audit (id INTEGER NOT NULL, who INTEGER NOT NULL)",
        "CREATE OR REPLACE FUNCTION reindex_audit() RETURNS trigger AS $$ BEGIN "
        "INSERT INTO reindex_audit VALUES (NEW.id, pg_backend_pid()); RETURN NEW; END $$ LANGUAGE plpgsql",
        f"CREATE TRIGGER reindex_audit AFTER UPDATE ON {OWNER} FOR EACH ROW EXECUTE FUNCTION reindex_audit()",
    ],
    "mysql": [
        "CREATE TABLE reindex_audit (id INTEGER NOT NULL, who INTEGER NOT NULL)",
        f"CREATE TRIGGER reindex_audit AFTER UPDATE ON {OWNER} FOR EACH ROW "
        "INSERT INTO reindex_audit VALUES (NEW.id, CONNECTION_ID())",
    ],
}


def _start(db_url: str, master: Path, key: int, *extra: str) -> subprocess.Popen[str]:
    args = ["reencrypt", "--database-url", db_url, "--cmk", f"local:{master}", "--key", f"{key:016x}",
            "--grace", "1", "--batch-size", "20", "--workers", "2", "--json",
            *(a for s in SPECS for a in ("--index", s)), *extra]  # fmt: skip
    return subprocess.Popen([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _watch(proc: subprocess.Popen[str]) -> tuple[set[int], str, str]:
    """The worker processes seen while the command ran, and its output."""
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        seen.update(worker_processes(proc.pid))
        time.sleep(0.01)
    out, err = proc.communicate(timeout=60)
    return seen, out, err


@pytest.mark.backends("postgresql", "mysql")
def test_a_blind_index_key_is_moved_off_by_two_worker_processes(engine: Engine, db_url: str, tmp_path: Path) -> None:
    master = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(master), live=FAST)
    keys.create_table()
    Patient, twin = _models(keys)
    Patient.metadata.create_all(engine)
    data = _fill(engine, Patient, twin)
    with engine.begin() as conn:
        for statement in AUDIT[engine.dialect.name]:
            conn.execute(text(statement))
    old = _blind_key(engine, keys)
    new = keys.rotate_table_key(OWNER, scope="blind-index")

    # --rate: the digests take a few seconds, time enough to see the workers
    seen, out, err = _watch(_start(db_url, master, old, "--rate", "150"))
    assert "Traceback" not in err and len(seen) == 2, (seen, err)
    report = _returned(out, err)
    assert (report["remaining"], report["failed"], report["stopped"], report["retired"]) == (0, 0, False, True)
    assert report["reencrypted"] == sum(1 for r in data if r["email"]), report
    assert report["reindexed"] >= len(data), report  # every row of at least one index, summed over the workers
    assert report["kms_calls"] <= 2 + 2 * 3  # the blind-index keys in the parent, three keys per worker: not per row
    with engine.connect() as conn:
        writes = dict(conn.execute(text("SELECT id, COUNT(*) FROM reindex_audit GROUP BY id")).all())
        sessions = conn.execute(text("SELECT COUNT(DISTINCT who) FROM reindex_audit")).scalar_one()
    assert sessions == 2  # both processes wrote
    if engine.dialect.name == "mysql":  # each row's digest updated once (its tokens are in the token table)
        assert set(writes.values()) == {1} and len(writes) == sum(1 for r in data if r["email"]), writes
    assert key_statuses(engine, OWNER, kt.SCOPE_BLIND_INDEX) == {old: kt.RETIRED, new: kt.ACTIVE}
    reports = keys.verify_index(Patient.__table__)
    assert all(r.ok and not r.moving and r.key_id == f"{new:016x}" for r in reports), [str(r) for r in reports]
    _assert_like_twin(engine, keys, Patient, twin, data)

    before = stored_hash(engine)
    seen, out, err = _watch(_start(db_url, master, old))
    report = _returned(out, err)
    assert report["retired"] and (report["reencrypted"], report["reindexed"], report["kms_calls"]) == (0, 0, 0), report
    assert not seen  # retired by the first run: no worker started
    assert stored_hash(engine) == before  # nothing left to move: nothing written


def _returned(out: str, err: str) -> dict[str, object]:
    assert err.strip() == "" or "Traceback" not in err, err
    report: dict[str, object] = json.loads(out)
    return report
