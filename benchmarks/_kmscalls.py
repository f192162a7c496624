"""KMS calls of a cold process: one process writes N rows, another reads them.

Each "process" is a fresh KeyManager (empty key cache) with its own counted
boto3 client to moto, writing to a table that has no key yet. The same is
then run with latency injected before every KMS request, which shows what a
real network round trip to KMS adds (calls x latency, nothing per row).
"""

from __future__ import annotations

import time
from typing import Any

from ._backend import BackendEnv
from ._data import dataset
from ._orm import OrmTable
from ._settings import Settings
from ._variants import Variant

__all__ = ["run_kms_calls"]


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _one(env: BackendEnv, variant: Variant, rows: list[Any], latency_ms: float) -> dict[str, Any]:
    suffix = f"_kms_{int(latency_ms)}ms"
    writer_engine = env.engine()
    keys, writer_kms = env.key_manager(writer_engine)
    writer = OrmTable(variant, env, rows, suffix, keys=keys)
    writer.recreate()
    writer_kms.latency = latency_ms / 1000
    write_s = _timed(writer.insert)
    reader_engine = env.engine()
    reader_keys, reader_kms = env.key_manager(reader_engine)
    reader_kms.latency = latency_ms / 1000
    reader = OrmTable(variant, env, rows, suffix, keys=reader_keys)
    read_s = _timed(reader.select)
    result = {
        "insert_calls": dict(writer_kms.calls), "select_calls": dict(reader_kms.calls),
        "insert_s": write_s, "select_s": read_s,
        "insert_kms_s": writer_kms.seconds, "select_kms_s": reader_kms.seconds,
    }
    writer.dispose()
    reader_engine.dispose()
    return result


def run_kms_calls(env: BackendEnv, variants: list[Variant], settings: Settings) -> dict[str, Any]:
    rows = dataset(settings.rows)
    result: dict[str, Any] = {"rows": settings.rows, "latency_ms": settings.kms_latency_ms, "variants": {}}
    for variant in variants:
        if not variant.uses_keys:
            why = "no key" if variant.name == "plaintext" else "fixed key in the process"
            result["variants"][variant.name] = {"no_kms": why}
            continue
        result["variants"][variant.name] = {
            "no_latency": _one(env, variant, rows, 0.0),
            "with_latency": _one(env, variant, rows, settings.kms_latency_ms),
        }
    return result
