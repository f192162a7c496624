"""Rotation benchmark: rewrap cost against row-key count, encrypt-column throughput.

Not a test. Run ``python -m benchmarks.rotation [--url URL] [--sizes 1000,100000,1000000]``.
KMS is moto's server on 127.0.0.1 (real HTTP through boto3), the database
SQLite in a temporary folder unless ``--url`` names another (it is emptied).

What it shows: with 10 table keys, a rewrap makes 10 KMS calls and takes
about the same time whether the key table also holds 1k, 100k or 1M row
keys (they are wrapped by their table key, not by the CMK); and how many
rows per second ``op.encrypt_column`` converts, and re-encryption in the same run
(one and several workers, table-scoped and deterministic), with the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import boto3
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select

import sa_envelope.alembic  # noqa: F401  (registers op.encrypt_column)
from sa_envelope import AwsKmsProvider, EncryptedType, KeyManager, LivePolicy
from sa_envelope.jobs.reencrypt import ReencryptReport
from sa_envelope.keys import table as kt
from sa_envelope.envelope import format as fmt
from sa_envelope.providers.base import key_context

TABLE_KEYS = 10


def _kms() -> tuple[Any, Any]:
    from moto.server import ThreadedMotoServer

    for var, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(var, value)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_KMS"] = f"http://{host}:{port}"  # the worker processes' KMS
    client = boto3.client("kms", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    calls: Counter[str] = Counter()
    client.meta.events.register("before-call.kms", lambda model, **_: calls.__setitem__(model.name, calls[model.name] + 1))
    client.calls = calls
    return server, client


def _reset(engine: Any) -> None:
    meta = MetaData()
    meta.reflect(engine)
    meta.drop_all(engine)


def bench_rewrap(url: str, row_keys: int, client: Any) -> dict[str, Any]:
    engine = create_engine(url)
    _reset(engine)
    cmk_a = client.create_key()["KeyMetadata"]["Arn"]
    cmk_b = client.create_key()["KeyMetadata"]["Arn"]
    keys = KeyManager(engine, AwsKmsProvider(cmk_a, client=client))
    keys.create_table()
    parents = []
    with engine.begin() as conn:
        for i in range(TABLE_KEYS):
            key_id, owner = fmt.new_key_id(), f"table_{i}"
            dk = keys.provider.generate(key_context(owner, fmt.format_key_id(key_id)))
            kt.insert_record(conn, keys.table, kt.KeyRecord(key_id, kt.SCOPE_TABLE, owner, None, dk.wrapping_key_id,
                                                            dk.wrapped, "AES-256-GCM", kt.ACTIVE))
            parents.append((key_id, owner))
        now = kt.utcnow()
        for start in range(0, row_keys, 10_000):  # row keys: wrapped by their table key, never by the CMK
            conn.execute(keys.table.insert(), [
                {"id": fmt.new_key_id(), "scope": kt.SCOPE_ROW, "owner_table": parents[n % TABLE_KEYS][1],
                 "parent_id": parents[n % TABLE_KEYS][0], "wrapping_key_id": "parent", "wrapped_key": os.urandom(60),
                 "algorithm": "AES-256-GCM", "status": kt.ACTIVE, "created_at": now, "updated_at": now}
                for n in range(start, min(row_keys, start + 10_000))
            ])
    client.calls.clear()
    started = time.perf_counter()
    report = keys.rewrap(to=AwsKmsProvider(cmk_b, client=client), progress=False)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {"row_keys": row_keys, "seconds": round(elapsed, 3), "kms_calls": sum(client.calls.values()),
            "rewrapped": report.rewrapped}


def bench_encrypt_column(url: str, rows: int, client: Any) -> dict[str, Any]:
    engine = create_engine(url)
    _reset(engine)
    keys = KeyManager(engine, AwsKmsProvider(client.create_key()["KeyMetadata"]["Arn"], client=client))
    keys.create_table()
    table = Table("people", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("email", String(200)))
    table.create(engine)
    with engine.begin() as conn:
        for start in range(0, rows, 10_000):
            conn.execute(table.insert(), [{"id": i, "email": f"user{i}@example.org"}
                                          for i in range(start, min(rows, start + 10_000))])
    started = time.perf_counter()
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"transaction_per_migration": True})
        with context.begin_transaction(_per_migration=True):  # as Alembic runs a revision
            Operations(context).encrypt_column("people", "email", EncryptedType(String(200)), keys=keys, batch_size=1000)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {"rows": rows, "seconds": round(elapsed, 3), "rows_per_second": int(rows / elapsed)}


def prepare_reencrypt(url: str, rows: int, client: Any, *, deterministic: bool = False) -> tuple[Any, Any, Any, int]:
    """A table of ``rows`` values under one key, rotated: (engine, keys, table, the old key's id)."""
    engine = create_engine(url)
    _reset(engine)
    keys = KeyManager(engine, AwsKmsProvider(client.create_key()["KeyMetadata"]["Arn"], client=client),
                      live=LivePolicy(ttl=0.1, grace=1.0))
    keys.create_table()
    table = Table("people", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("email", EncryptedType(String(200), keys, deterministic=deterministic)))
    table.create(engine)
    with engine.begin() as conn:
        for start in range(0, rows, 10_000):
            conn.execute(table.insert(), [{"id": i, "email": f"user{i}@example.org"}
                                          for i in range(start + 1, min(rows, start + 10_000) + 1)])
    scope = kt.SCOPE_DETERMINISTIC if deterministic else kt.SCOPE_TABLE
    with engine.connect() as conn:
        old = conn.execute(select(keys.table.c.id).where(keys.table.c.scope == scope)).scalar_one()
    keys.rotate_table_key("people", scope=scope)
    time.sleep(3.5 if deterministic else 0)  # past the switch: the job would wait for it
    keys.clear_cache()  # a fresh job process: its KMS calls are one per key it needs
    client.calls.clear()
    return engine, keys, table, old


def reencrypt_argv(url: str, keys: Any, old: int, workers: int, batch_size: int) -> list[str]:
    """``sa-envelope reencrypt`` as an operator runs it."""
    return [sys.executable, "-m", "sa_envelope", "reencrypt", "--database-url", url, "--cmk",
            keys.provider.wrapping_key_id, "--key", fmt.format_key_id(old), "--batch-size", str(batch_size),
            "--workers", str(workers), "--grace", "1", "--json"]


def bench_reencrypt(url: str, rows: int, client: Any, *, workers: int = 1, deterministic: bool = False,
                    batch_size: int = 1000, processes: bool = True) -> dict[str, Any]:
    """Re-encrypt every value of one column off its key (rotated first), with ``workers``:
    by ``sa-envelope reencrypt --workers N`` (N worker processes, each its own engine and
    provider; the command's start is in the time), or with ``processes=False`` by
    ``keys.reencrypt(workers=N)`` in this process (threads)."""
    engine, keys, table, old = prepare_reencrypt(url, rows, client, deterministic=deterministic)
    started = time.perf_counter()
    if processes:  # the command itself, as an operator runs it: its start is in the time
        done = subprocess.run(reencrypt_argv(url, keys, old, workers, batch_size), capture_output=True, text=True,
                              check=True)
        elapsed = time.perf_counter() - started
        out = json.loads(done.stdout)
        report = ReencryptReport(out["key"], out["reencrypted"], out["failed"], out["remaining"])
        kms = out["kms_calls"]
    else:
        report = keys.reencrypt([table.c.email], key_id=old, batch_size=batch_size, workers=workers, progress=False)
        elapsed = time.perf_counter() - started
        kms = sum(client.calls.values())
    engine.dispose()
    assert report.remaining == 0 and report.reencrypted == rows, report
    return {"rows": rows, "workers": workers, "cli_processes": processes,
            "deterministic": deterministic, "seconds": round(elapsed, 3),
            "rows_per_second": int(rows / elapsed), "kms_calls": kms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="database URL (emptied!); default SQLite in a temporary folder")
    parser.add_argument("--sizes", default="1000,100000", help="row-key counts (add 1000000 for the full run)")
    parser.add_argument("--encrypt-rows", type=int, default=20_000)
    parser.add_argument("--workers", default="1,2", help="re-encryption worker counts to measure")
    parser.add_argument("--reencrypt-rows", type=int, help="rows of the re-encryption runs (default --encrypt-rows)")
    parser.add_argument("--threads", action="store_true", help="workers as threads of this process (the API's "
                        "keys.reencrypt(workers=N)), not processes (the CLI's --workers N)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each job (the median is reported)")
    parser.add_argument("--skip-rewrap", action="store_true")
    parser.add_argument("--json", help="write the figures to this file too")
    ns = parser.parse_args()
    server, client = _kms()
    try:
        with tempfile.TemporaryDirectory() as folder:
            url = ns.url or f"sqlite:///{folder}/bench.db"
            results: dict[str, Any] = {"url": url.split("@")[-1], "rows": ns.encrypt_rows}
            if not ns.skip_rewrap:
                print(f"rewrap, {TABLE_KEYS} table keys, {url.split(':')[0]}:")
                results["rewrap"] = [bench_rewrap(url, size, client) for size in (int(s) for s in ns.sizes.split(","))]
                for line in results["rewrap"]:
                    print("  ", line)
            results.update(_jobs_in_one_run(url, ns, client))
            if ns.json:
                Path(ns.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        server.stop()


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["rows_per_second"])[len(runs) // 2]


def _jobs_in_one_run(url: str, ns: Any, client: Any) -> dict[str, Any]:
    """encrypt_column and re-encryption in the same run, interleaved, with the ratios the issue targets."""
    out: dict[str, Any] = {}
    workers = [int(w) for w in ns.workers.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {}
    rows = ns.reencrypt_rows or ns.encrypt_rows
    for _ in range(ns.rounds):
        runs.setdefault("encrypt_column", []).append(bench_encrypt_column(url, ns.encrypt_rows, client))
        for w in workers:
            runs.setdefault(f"reencrypt_{w}w", []).append(
                bench_reencrypt(url, rows, client, workers=w, processes=not ns.threads))
        runs.setdefault("reencrypt_det_1w", []).append(
            bench_reencrypt(url, rows, client, workers=1, deterministic=True))
    for name, found in runs.items():
        out[name] = _median(found)
        out[name]["rounds_rows_per_second"] = [r["rows_per_second"] for r in found]
        print(f"{name}:", out[name])
    base = out["encrypt_column"]["rows_per_second"]
    ratios = {name: round(r["rows_per_second"] / base, 2) for name, r in out.items() if name != "encrypt_column"}
    if f"reencrypt_{workers[0]}w" in out and len(workers) > 1:
        one = out[f"reencrypt_{workers[0]}w"]["rows_per_second"]
        ratios["workers_speedup"] = round(out[f"reencrypt_{workers[-1]}w"]["rows_per_second"] / one, 2)
    out["ratios"] = ratios
    print("ratios (to encrypt_column; workers_speedup: last over first):", ratios)
    return out


if __name__ == "__main__":
    main()
