"""Where re-encryption's time goes with 1 and 2 worker processes (issue 16).

Not a test. ``python -m benchmarks.workers_cpu --url URL [--rows 100000,300000]
[--rounds 3] [--workers 1,2] [--batch-size 1000] [--json FILE]``: runs
``sa-envelope reencrypt --workers N`` (as :mod:`benchmarks.rotation` does,
the command's start in the time), interleaved, and for each run reports
wall time, the CPU seconds of the command and of each worker process, of
the database server and of everything else on the machine
(:mod:`._cpusplit`), the load average, what the server's connections were
doing (sampled) and the server's counters for the run (statements,
transactions, rows read and written, row-lock waits). The URL's database
is emptied.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from ._cpusplit import CpuSampler
from .rotation import _kms, prepare_reencrypt, reencrypt_argv

PG_STATES = text(
    "SELECT pid, state, coalesce(wait_event_type, 'CPU'), coalesce(wait_event, '-') FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)
MY_STATES = text(
    "SELECT tid, command, coalesce(state, '') FROM information_schema.processlist "
    "WHERE db = database() AND id <> connection_id() AND command <> 'Daemon'"
)
MY_COUNTERS = (
    "Questions", "Com_select", "Com_update", "Com_update_multi", "Com_commit", "Com_begin", "Com_rollback",
    "Innodb_row_lock_waits", "Innodb_row_lock_time", "Innodb_rows_read", "Innodb_rows_updated",
    "Handler_read_next", "Handler_read_key",
)  # fmt: skip


class Server:
    """The probe and the counters of one backend, from one connection of their own."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.pg = self.engine.dialect.name == "postgresql"
        self.process = "postgres" if self.pg else "mariadbd"
        if not self.pg:
            self.server_pid = next(
                int(e.name) for e in os.scandir("/proc")
                if e.name.isdigit() and Path(e.path, "comm").read_text().strip() == "mariadbd"
            )  # fmt: skip

    def probe(self) -> tuple[Counter[str], list[str]]:
        """What the benchmark database's other connections are doing, and their /proc paths."""
        rows = self.conn.execute(PG_STATES if self.pg else MY_STATES).all()
        states = Counter(":".join(str(v) for v in row[1:]) for row in rows)
        if self.pg:
            return states, [str(row[0]) for row in rows]
        return states, [f"{self.server_pid}/task/{row[0]}" for row in rows]

    def counters(self) -> dict[str, float]:
        if self.pg:
            db = self.conn.execute(text(
                "SELECT xact_commit, xact_rollback, tup_fetched, tup_updated, blks_hit, blks_read "
                "FROM pg_stat_database WHERE datname = current_database()")).one()  # fmt: skip
            out = dict(db._mapping)
            table = self.conn.execute(text(
                "SELECT idx_scan, idx_tup_fetch, seq_scan, seq_tup_read, n_tup_upd, n_tup_hot_upd "
                "FROM pg_stat_user_tables WHERE relname = 'people'")).first()  # fmt: skip
            return {**out, **(dict(table._mapping) if table else {})}
        rows = self.conn.execute(text("SHOW GLOBAL STATUS")).all()
        return {k: float(v) for k, v in rows if k in MY_COUNTERS}

    def settle(self) -> None:
        """Let the statistics collector catch up (PostgreSQL reports counters at a backend's exit or idle)."""
        if self.pg:
            time.sleep(1.0)
            self.conn.execute(text("SELECT pg_stat_clear_snapshot()"))


def one_run(url: str, rows: int, client: Any, workers: int, batch: int) -> dict[str, Any]:
    engine, keys, _, old = prepare_reencrypt(url, rows, client)
    engine.dispose()
    server = Server(url)
    server.settle()
    before = server.counters()
    sampler = CpuSampler(server.process, probe=server.probe)
    load = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen(reencrypt_argv(url, keys, old, workers, batch), stdout=subprocess.PIPE, text=True)
    sampler.start(proc.pid)
    out, _ = proc.communicate()
    elapsed = time.perf_counter() - started
    split = sampler.stop()
    server.settle()
    after = server.counters()
    server.conn.close()
    server.engine.dispose()
    report = json.loads(out)
    assert report["remaining"] == 0 and report["reencrypted"] == rows, report
    delta = {k: round(after[k] - before.get(k, 0), 1) for k in after}
    return {"workers": workers, "rows": rows, "batch_size": batch, "seconds": round(elapsed, 3),
            "rows_per_second": int(rows / elapsed), "loadavg_1m": round(load[0], 2), **split,
            "server_counters": delta, "kms_calls": report["kms_calls"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="database URL (emptied!)")
    parser.add_argument("--rows", default="100000", help="table sizes (a,b: the difference between two sizes "
                        "gives the rate without the fixed start-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--json", help="append every run's figures to this file (JSON lines)")
    ns = parser.parse_args()
    server, client = _kms()
    try:
        for round_ in range(ns.rounds):
            for rows, w in ((int(r), int(x)) for r in ns.rows.split(",") for x in ns.workers.split(",")):
                result = {"round": round_, **one_run(ns.url, rows, client, w, ns.batch_size)}
                print(json.dumps(result), flush=True)
                if ns.json:
                    with Path(ns.json).open("a") as f:
                        f.write(json.dumps(result) + "\n")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
