"""The fresh reader process of the streaming section (see ``_stream``).

Run as ``python -m benchmarks._stream_child '<json spec>'``; prints one JSON
line. Nothing is cached from the writer: a new interpreter, a new engine, a
new KeyManager with its own counted boto3 client to the parent's moto.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

__all__ = ["main"]


def _rss_mib() -> float:
    """Current resident set size, from /proc (Linux), in MiB; 0 elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return 0.0
    return pages * resource.getpagesize() / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak measured
    afterwards is the stream's and not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def _peak_mib() -> float:
    """Peak RSS in MiB: VmHWM (resettable) where /proc has it, else ru_maxrss."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _manager(spec: dict[str, Any]) -> tuple[Any, Any, list[int]]:
    import boto3
    from sqlalchemy import create_engine

    from sa_envelope import AwsKmsProvider, KeyManager

    from ._kms import CREDENTIALS, REGION

    session = boto3.session.Session(region_name=REGION, aws_access_key_id=CREDENTIALS["aws_access_key_id"],
                                    aws_secret_access_key=CREDENTIALS["aws_secret_access_key"])
    client = session.client("kms", endpoint_url=spec["endpoint"])
    calls = [0]

    def count(**_: Any) -> None:
        calls[0] += 1

    client.meta.events.register("before-call.kms", count)
    engine = create_engine(spec["url"])
    keys = KeyManager(engine, AwsKmsProvider(spec["cmk"], client=client), table_name=spec["key_table"])
    return engine, keys, calls


def read(spec: dict[str, Any]) -> dict[str, Any]:
    from sqlalchemy import select

    from ._stream import stream_table

    engine, keys, calls = _manager(spec)
    table = stream_table(spec["scope"], keys)
    # A tenth of the stream, but never less than two partitions, so the first
    # stretch is not just the query's start and one fetch.
    checkpoint = min(spec["rows"], max(spec["rows"] // 10, 2 * spec["batch"]))
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1").all()  # connected before the baseline
        reset = _reset_peak()
        base_rss, base_peak = _rss_mib(), _peak_mib()
        count, at_checkpoint = 0, 0.0
        start = time.perf_counter()
        result = conn.execution_options(yield_per=spec["batch"]).execute(select(*table.c[1:]))
        for email, ssn, notes in result:
            count += 1 if email and ssn and notes else 0
            if count == checkpoint:
                at_checkpoint = time.perf_counter() - start
        seconds = time.perf_counter() - start
    per_row_growth = (seconds / count) / (at_checkpoint / checkpoint) if count and at_checkpoint else None
    rows = keys.rows
    return {
        "rows_read": count, "seconds": seconds, "checkpoint_rows": checkpoint, "checkpoint_s": at_checkpoint,
        "us_per_row": 1e6 * seconds / max(count, 1), "per_row_growth": per_row_growth,
        "peak_rss_growth_mib": _peak_mib() - base_peak, "rss_growth_mib": _rss_mib() - base_rss,
        "base_rss_mib": base_rss, "peak_reset": reset, "kms_calls": calls[0],
        "row_key_queries": getattr(rows, "key_queries", None), "row_keys_cached": len(rows.cache),
    }


def main(argv: list[str]) -> int:
    print(json.dumps(read(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
