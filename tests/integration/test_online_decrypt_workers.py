"""``sa-envelope decrypt-column --workers 2``: the reverse migration by two worker
processes (real subprocesses of the real CLI), on the server backends.

Between the expand and the contract of a decryption, ``code`` holds the
ciphertext and ``code__plaintext`` the shadow the backfill fills. A trigger
logs every UPDATE with the database session that made it, so the test sees
each row decrypted exactly once, by one of two sessions; the shadow then
holds each row's original plaintext; a rerun writes nothing, calls no KMS
and leaves every stored byte as it was.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.engine import Engine

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from support.rotation import PYTHON, ROOT, stored_hash, subprocess_env

ROWS = 3000
AUDIT = {  # every UPDATE of a row, with the session that made it (in the writer's transaction)
    "postgresql": [
        "CREATE TABLE audit (id INTEGER NOT NULL, who INTEGER NOT NULL)",
        "CREATE OR REPLACE FUNCTION audit_docs() RETURNS trigger AS $$ BEGIN "
        "INSERT INTO audit VALUES (NEW.id, pg_backend_pid()); RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER docs_audit AFTER UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION audit_docs()",
    ],
    "mysql": [
        "CREATE TABLE audit (id INTEGER NOT NULL, who INTEGER NOT NULL)",
        "CREATE TRIGGER docs_audit AFTER UPDATE ON docs FOR EACH ROW INSERT INTO audit VALUES (NEW.id, CONNECTION_ID())",
    ],
}


OPTIONS: dict[str, dict[str, Any]] = {"table": {"deterministic": True}, "row": {"scope": "row"}}


def original(i: int) -> str | None:
    return f"code-{i}-é'\"" if i % 13 else None


def decrypt_column(db_url: str, key_file: Path, scope: str, *extra: str) -> tuple[int, int, str]:
    """(rows written, KMS calls, stdout) of one ``decrypt-column`` run, which must succeed."""
    kind = ["--deterministic"] if scope == "table" else ["--scope", "row"]
    args = ["decrypt-column", "--url", db_url, "--table", "docs", "--column", "code", *kind,
            "--cmk", f"local:{key_file}", "--batch", "100", "--chunk", "300", *extra]  # fmt: skip
    result = subprocess.run([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written, calls = re.search(r": (\d+) rows written", result.stdout), re.search(r"KMS calls: (\d+)", result.stdout)
    assert written and calls, result.stdout
    return int(written[1]), int(calls[1]), result.stdout


@pytest.mark.backends("postgresql", "mysql")
@pytest.mark.parametrize("scope", ["table", "row"])
def test_decrypt_column_by_two_worker_processes(db_url: str, engine: Engine, tmp_path: Path, scope: str) -> None:
    key_file = tmp_path / "master.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    keys.create_table()
    docs = Table(
        "docs", MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("code", EncryptedType(String(60), keys, **OPTIONS[scope])),
        Column("code__plaintext", String(60)),  # the expand of the decryption: empty
    )  # fmt: skip
    docs.create(engine)
    with engine.begin() as conn:
        conn.execute(docs.insert(), [{"id": i, "code": original(i)} for i in range(1, ROWS + 1)])
        for statement in AUDIT[engine.dialect.name]:
            conn.execute(text(statement))
    expected = {i: original(i) for i in range(1, ROWS + 1)}
    filled = sum(1 for v in expected.values() if v is not None)

    written, calls, out = decrypt_column(db_url, key_file, scope, "--workers", "2", "--rate", "2000")
    assert written == filled, out
    # table scope: the column's key, once per worker process and the parent; row scope: a provider-wrapped
    # parent key likewise (the row keys are wrapped by it): never one call per row
    assert calls <= 1 + 2, out
    with engine.connect() as conn:
        writes = dict(conn.execute(text("SELECT id, COUNT(*) FROM audit GROUP BY id")).all())
        sessions = conn.execute(text("SELECT COUNT(DISTINCT who) FROM audit")).scalar_one()
        shadow = dict(conn.execute(select(docs.c.id, docs.c.code__plaintext)).all())
        ciphertext = dict(conn.execute(select(docs.c.id, docs.c.code)).all())
    assert writes == {i: 1 for i, v in expected.items() if v is not None}  # each row decrypted exactly once
    assert sessions == 2  # by both worker processes
    assert shadow == expected  # the original plaintext, NULLs left NULL
    assert ciphertext == expected  # the encrypted half untouched

    before = stored_hash(engine)
    written, calls, out = decrypt_column(db_url, key_file, scope, "--workers", "2")
    assert (written, calls) == (0, 0), out
    assert stored_hash(engine) == before
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM audit")).scalar_one() == filled  # the rerun updated nothing
