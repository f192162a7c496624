"""Streaming: N rows read with ``yield_per(10_000)`` in a fresh process.

A row-scoped table and a table-scope table of the same N rows (three
columns, as everywhere) are written untimed, then each is read by a new
Python process (``python -m benchmarks._stream_child``) that starts with an
empty key cache and its own counted KMS client, so the read pays every key
unwrap a real cold reader pays. The child reports:

- the seconds of the whole stream, and at a tenth of it (at least two
  partitions), so that the time per row over the whole stream divided by the
  time per row over its first tenth says whether the cost per row stays flat
  (1.0) as the stream grows: at 1,000,000 rows, 1,000,000 against 100,000;
- its peak RSS growth over the stream (``getrusage`` ``ru_maxrss``, measured
  after imports, engine and first connection), beside the same figure for
  the table-scope stream, which holds the same partitions;
- its KMS calls and row-key queries.

``--stream-rows`` sets N (quick: 50,000; ``--full``: 1,000,000).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from ._backend import KEY_TABLE, PREFIX, BackendEnv
from ._data import dataset
from ._settings import Settings
from ._variants import COLUMNS

__all__ = ["BATCH", "run_stream", "stream_table"]

BATCH = 10_000  # yield_per, and rows per insert transaction while loading
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 4 * 3600


def stream_table(scope: str, keys: Any) -> Table:
    """The streamed table; the child declares the same to read it."""
    from sa_envelope import EncryptedType

    metadata = MetaData()
    return Table(
        f"{PREFIX}stream_{scope}", metadata, Column("id", Integer, primary_key=True),
        *(Column(name, EncryptedType(String(length), keys, scope=scope)) for name, length in COLUMNS.items()),
    )


def _load(env: BackendEnv, scope: str, rows: int) -> float:
    """Untimed for the report (returned for orientation): write ``rows`` rows."""
    import time

    engine = env.engine()
    keys, _ = env.key_manager(engine)
    table = stream_table(scope, keys)
    table.metadata.drop_all(engine)
    table.metadata.create_all(engine)
    start = time.perf_counter()
    try:
        for offset in range(0, rows, BATCH):
            chunk = dataset(min(BATCH, rows - offset), seed=offset)
            with engine.begin() as conn:
                if scope == "row":
                    row_keys = keys.new_row_keys(conn, table.name, len(chunk))
                    params = [{n: k.value(v) for n, v in zip(COLUMNS, row)} for k, row in zip(row_keys, chunk)]
                else:
                    params = [dict(zip(COLUMNS, row)) for row in chunk]
                conn.execute(insert(table), params)
        return time.perf_counter() - start
    finally:
        engine.dispose()


def _child(env: BackendEnv, scope: str, rows: int) -> dict[str, Any]:
    spec = {"url": env.url, "endpoint": env.kms.endpoint, "cmk": env.cmk, "scope": scope, "rows": rows,
            "batch": BATCH, "key_table": KEY_TABLE}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks._stream_child", json.dumps(spec)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"unavailable": f"reader process failed ({done.returncode}): {tail}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_stream(env: BackendEnv, settings: Settings) -> dict[str, Any]:
    """The streaming section on one backend: table scope, then row scope."""
    result: dict[str, Any] = {"rows": settings.stream_rows, "batch": BATCH, "scopes": {}}
    for scope in ("table", "row"):
        load_s = _load(env, scope, settings.stream_rows)
        read = _child(env, scope, settings.stream_rows)
        read["load_s"] = load_s
        result["scopes"][scope] = read
        engine = env.engine()
        try:
            stream_table(scope, None).metadata.drop_all(engine)
        finally:
            engine.dispose()
    table, row = result["scopes"]["table"], result["scopes"]["row"]
    if "seconds" in table and "seconds" in row:
        result["row_vs_table"] = row["seconds"] / table["seconds"]
    return result
