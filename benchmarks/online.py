"""Online backfill benchmark: rows/s with and without a concurrent write load.

Not a test. Run ``python -m benchmarks.online [--backend postgresql,mysql,sqlite] [--rows 20000]``.
Each server backend gets a database of its own, ``sae_migrate_bench``, made
and dropped by the run (``--url`` names another; its ``bench_users`` table is
dropped). Keys come from a local key file: KMS is not what is measured (the
backfill makes one unwrap per key whatever the rows).

For each backend: ``bench_users`` holds ``--rows`` plaintext emails and an
empty encrypted shadow; the backfill (``sa_envelope.jobs.backfill``, the job
behind ``sa-envelope encrypt-column``) fills it with ``--workers`` threads,
first on a quiet database, then again (shadow emptied) while a separate
process runs ``--writers`` threads of dual-writing single-row UPDATEs, each
its own transaction, as fast as they go. It prints rows/s of both runs,
their ratio (the target: >= 0.5) and the load's writes/s.

``--compare-workers ROUNDS`` measures instead ``sa-envelope encrypt-column``
itself with 1 and with 2 worker processes (``--workers 2``) on a quiet
database, interleaved, ROUNDS times, and prints the medians and their ratio
(the target: >= 1.6 on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table, create_engine, insert, text, update
from sqlalchemy.engine import make_url

from sa_envelope import EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.jobs.backfill import backfill
from sa_envelope.jobs.claims import Claims

SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/sae_migrate_bench",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/sae_migrate_bench",
}
TABLE = "bench_users"


def _table(keys: Any = None) -> Table:
    enc = EncryptedType(String(200), keys, deterministic=True, migrating_from="email")
    return Table(TABLE, MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
                 Column("email", String(200)), Column("email__encrypted", enc if keys else LargeBinary))


def _database(url: str, create: bool) -> None:
    u = make_url(url)
    admin = create_engine(u.set(database="postgres" if u.get_backend_name() == "postgresql" else "mysql"),
                          isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {u.database}"))
            if create:
                conn.execute(text(f"CREATE DATABASE {u.database}"))
    finally:
        admin.dispose()


def _load(url: str, keyfile: str, rows: int, writers: int, stop: Any, counter: Any) -> None:
    """The application: dual-writing UPDATEs of random rows until ``stop``."""
    engine = create_engine(url, pool_size=writers + 2)
    keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
    table = _table(keys)

    def write(seed: int) -> None:
        rng, n = random.Random(seed), 0
        while not stop.is_set():
            i = rng.randrange(1, rows + 1)
            with engine.begin() as conn:
                conn.execute(update(table).where(table.c.id == i).values(email__encrypted=f"w{seed}-{n}@example.org"))
            n += 1
        with counter.get_lock():
            counter.value += n

    threads = [threading.Thread(target=write, args=(s,)) for s in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()


def _run_backfill(engine: Any, keys: KeyManager, workers: int, batch: int) -> tuple[float, int]:
    enc = EncryptedType(String(200), keys, deterministic=True, context=f"{TABLE}.email")
    started = time.perf_counter()
    report = backfill(keys.store, enc, TABLE, "email", "email__encrypted", batch_size=batch, workers=workers,
                      restart=True, progress=False)
    return time.perf_counter() - started, report.written


def _run_cli(url: str, keyfile: str, workers: int, batch: int) -> tuple[float, int, int]:
    """``sa-envelope encrypt-column --workers N`` (N worker processes; the command's
    start is in the time): (seconds, rows written, KMS calls)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sa_envelope", "encrypt-column", "--url", url, "--table", TABLE,
                           "--column", "email", "--deterministic", "--cmk", f"local:{keyfile}", "--batch",
                           str(batch), "--workers", str(workers), "--restart"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    elapsed = time.perf_counter() - started
    written = re.search(r": (\d+) rows written", done.stdout)
    calls = re.search(r"KMS calls: (\d+)", done.stdout)
    assert written and calls, done.stdout
    return elapsed, int(written[1]), int(calls[1])


def bench_workers(url: str, rows: int, batch: int, keyfile: str, rounds: int) -> dict[str, Any]:
    """The CLI with 1 and 2 worker processes on a quiet database, interleaved, ``rounds`` times."""
    engine = create_engine(url)
    raw = _table()
    found: dict[int, list[float]] = {1: [], 2: []}
    calls: dict[int, int] = {}
    try:
        keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
        keys.create_table()
        raw.drop(engine, checkfirst=True)
        raw.create(engine)
        with engine.begin() as conn:
            conn.execute(insert(raw), [{"id": i, "email": f"user{i}@example.org"} for i in range(1, rows + 1)])
        for _ in range(rounds):
            for workers in (1, 2):
                with engine.begin() as conn:
                    conn.execute(update(raw).values(email__encrypted=None))
                seconds, written, calls[workers] = _run_cli(url, keyfile, workers, batch)
                assert written == rows, (written, rows)
                found[workers].append(rows / seconds)
        raw.drop(engine)
        Claims(engine, "").table.drop(engine, checkfirst=True)
    finally:
        engine.dispose()
    median = {w: sorted(r)[len(r) // 2] for w, r in found.items()}
    return {"rows_s": median, "rounds": found, "speedup": median[2] / median[1], "kms_calls": calls}


def bench(url: str, rows: int, workers: int, writers: int, batch: int, keyfile: str) -> dict[str, Any]:
    engine = create_engine(url, pool_size=workers + 4)
    try:
        keys = KeyManager(engine, LocalKeyProvider.from_file(keyfile))
        keys.create_table()
        raw = _table()
        raw.drop(engine, checkfirst=True)
        raw.create(engine)
        with engine.begin() as conn:
            conn.execute(insert(raw), [{"id": i, "email": f"user{i}@example.org"} for i in range(1, rows + 1)])
        quiet_s, quiet_rows = _run_backfill(engine, keys, workers, batch)
        with engine.begin() as conn:
            conn.execute(update(raw).values(email__encrypted=None))
        stop, counter = multiprocessing.Event(), multiprocessing.Value("l", 0)
        load = multiprocessing.Process(target=_load, args=(url, keyfile, rows, writers, stop, counter))
        load.start()
        time.sleep(1.0)  # the load is running before the backfill starts
        loaded_s, loaded_rows = _run_backfill(engine, keys, workers, batch)
        stop.set()
        load.join()
        # rows visited per second: under load some rows need no write (the application wrote them)
        quiet_rate, loaded_rate = rows / quiet_s, rows / loaded_s
        raw.drop(engine)
        Claims(engine, "").table.drop(engine, checkfirst=True)
        return {
            "quiet_rows_s": quiet_rate,
            "loaded_rows_s": loaded_rate,
            "ratio": loaded_rate / quiet_rate,
            "load_writes_s": counter.value / (loaded_s + 1.0),
            "loaded_rows": loaded_rows,
        }
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="postgresql,mysql")
    parser.add_argument("--url", help="one database URL instead of --backend (its bench_users table is dropped)")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--writers", type=int, default=2, help="application threads of the write load")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--compare-workers", type=int, metavar="ROUNDS", help="instead: the CLI with 1 and 2 "
                        "worker processes on a quiet database, interleaved, ROUNDS times (medians)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        keyfile = os.path.join(tmp, "master.key")
        LocalKeyProvider.from_file(keyfile)
        targets = [("url", args.url)] if args.url else []
        for name in [] if args.url else args.backend.split(","):
            targets.append((name, f"sqlite:///{tmp}/bench.db" if name == "sqlite" else SERVERS[name]))
        if args.compare_workers:
            print("| backend | rows | 1 worker (rows/s) | 2 worker processes (rows/s) | speed-up | KMS calls (1 / 2) "
                  "| rounds (1 / 2) |\n|---|---:|---:|---:|---:|---:|---|")
        else:
            print("| backend | rows | backfill alone (rows/s) | under load (rows/s) | ratio | load (writes/s) |")
            print("|---|---:|---:|---:|---:|---:|")
        for name, url in targets:
            own = name in SERVERS
            if own:
                _database(url, create=True)
            try:
                if args.compare_workers:
                    w = bench_workers(url, args.rows, args.batch, keyfile, args.compare_workers)
                    rounds = " / ".join(", ".join(f"{x:,.0f}" for x in w["rounds"][n]) for n in (1, 2))
                    print(f"| {name} | {args.rows:,} | {w['rows_s'][1]:,.0f} | {w['rows_s'][2]:,.0f} | "
                          f"{w['speedup']:.2f}x | {w['kms_calls'][1]} / {w['kms_calls'][2]} | {rounds} |", flush=True)
                    continue
                r = bench(url, args.rows, 1 if name == "sqlite" else args.workers, args.writers, args.batch, keyfile)
            finally:
                if own:
                    _database(url, create=False)
            print(f"| {name} | {args.rows:,} | {r['quiet_rows_s']:,.0f} | {r['loaded_rows_s']:,.0f} | "
                  f"{r['ratio']:.2f} | {r['load_writes_s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
