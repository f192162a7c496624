"""Helpers shared by the rotation test modules (rewrap, roll-over, Alembic, CLI)."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, Table, inspect, select
from sqlalchemy.engine import Engine

from sa_envelope import KeyManager
from sa_envelope.keys import table as kt

from . import ROOT
from .models import data_tables


def fill(engine: Engine, keys: KeyManager, tables: int = 3, rows: int = 100) -> list[Table]:
    """Create and fill the data tables; returns them (bound to ``keys``)."""
    keys.create_table()
    result = data_tables(keys, tables)
    result[0].metadata.create_all(engine)
    for table in result:
        with engine.begin() as conn:
            conn.execute(table.insert(), [expected_row(i) for i in range(rows)])
    return result


def expected_row(i: int) -> dict[str, Any]:
    return {"id": i, "name": f"name {i}", "ssn": f"{i:03d}-00-0000"}


def read_all(engine: Engine, keys: KeyManager, tables: int) -> list[list[dict[str, Any]]]:
    """Every row of every data table, decrypted through ``keys``."""
    out = []
    with engine.connect() as conn:
        for table in data_tables(keys, tables):
            out.append([dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))])
    return out


def stored_hash(engine: Engine) -> str:
    """SHA-256 over every stored byte of every table except the key table."""
    digest = hashlib.sha256()
    with engine.connect() as conn:
        meta = MetaData()
        meta.reflect(conn)
        for name in sorted(meta.tables):
            if name == kt.KEY_TABLE_NAME:
                continue
            table = meta.tables[name]
            for row in conn.execute(select(table).order_by(*table.primary_key.columns)):
                digest.update(repr(tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)).encode())
    return digest.hexdigest()


def provider_key_records(engine: Engine) -> list[Any]:
    """Every key row wrapped by a provider (not by a parent key)."""
    table = kt.key_table(MetaData())
    with engine.connect() as conn:
        rows = conn.execute(select(table).where(table.c.parent_id.is_(None))).all()
    return [kt.KeyRecord.from_row(r) for r in rows]


def key_statuses(engine: Engine, owner: str, scope: str = kt.SCOPE_TABLE) -> dict[int, str]:
    """Key id -> status of ``owner``'s provider-wrapped keys of ``scope``."""
    return {r.id: r.status for r in provider_key_records(engine) if r.owner_table == owner and r.scope == scope}


def cmk_uuid(arn: str) -> bytes:
    """moto's ciphertext blobs start with the CMK's key id (a UUID)."""
    return arn.rsplit("/", 1)[1].encode()


def subprocess_env(kms_server: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child process: this worktree first, moto as KMS."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if kms_server:
        env["AWS_ENDPOINT_URL_KMS"] = kms_server
    env.update(extra)
    return env


PYTHON = sys.executable


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def worker_processes(pid: int) -> list[int]:
    """The worker processes a CLI command (process ``pid``) started for ``--workers``:
    forked (the command's own command line) or spawned (multiprocessing's
    ``spawn_main``); its other children, such as a resource tracker, left out."""
    try:
        children = (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()
        own = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:  # the command ended
        return []
    found = []
    for child in children:
        try:
            command = (Path("/proc") / child / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command or command == own:
            found.append(int(child))
    return found
