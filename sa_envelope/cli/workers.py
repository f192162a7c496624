"""``--workers N`` of the CLI: N processes, each rebuilt from the command's arguments.

A worker process gets plain options (the database URL, the CMK spec, the
table and column names, the batch size, its share of ``--rate``) and makes
its own engine, provider and KeyManager from them, as a copy of the command
started by hand would; the database shares the rows out
(:mod:`sa_envelope.jobs.processes`). What must happen once happens in the
parent, before and after them: the re-encryption's rotation and wait for
the switch, and its count and retirement; the backfill's plan of ranges
(and ``--restart``). The parent sums their reports and KMS calls (one
unwrap per key per process, whatever the rows).
"""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Date, DateTime, Float, Integer, MetaData, Numeric, String, Table, Text
from sqlalchemy import Column, create_engine

from ..columns.encrypted import EncryptedType
from ..jobs.backfill import BackfillReport, backfill, plan_backfill
from ..jobs.processes import run_processes
from ..jobs.progress import progress_bar
from ..jobs.reencrypt import ReencryptReport, already_moved, conclude, count_left, moved_columns, prepare_move
from ..jobs.reencrypt import reencrypt_columns
from ..keys import table as kt
from ..jobs.scan import reflected_columns
from ..manager import KeyManager
from ..providers.spec import provider_from_spec
from .common import manager
from .indexes import parse_specs, reindexed_columns

__all__ = ["TYPES", "backfill_in_processes", "column_type", "moved_columns_of", "reencrypt_in_processes"]


def _share(rate: float | None, count: int) -> float | None:
    """Each process's part of a rate meant for all of them."""
    return rate / count if rate else None


# -- re-encryption ------------------------------------------------------------------------------


def moved_columns_of(keys: KeyManager, engine: Any, options: dict[str, Any]) -> list[Column[Any]]:
    """The columns the re-encryption moves, declared from the options alone
    (the same in the parent and in every worker): a blind-index key's from
    its ``--index`` specs, else the encrypted columns found by reflection."""
    if options.get("table") is not None:  # a blind-index key of this table
        specs = parse_specs(options["indexes"], blind=True)
        return reindexed_columns(keys, engine, options["table"], options["key"], specs, options["not_indexed"])
    return reflected_columns(keys, options["key"], options["names"])


def _reencrypt_child(options: dict[str, Any], *, index: int, count: int, bar: Any) -> dict[str, Any]:
    """One worker process of ``reencrypt`` (its partition of the rows)."""
    engine = create_engine(options["database_url"])
    try:
        keys = manager(argparse.Namespace(**options), engine)
        report = reencrypt_columns(
            keys.store, keys.live, moved_columns_of(keys, engine, options),
            key_id=options["key"], batch_size=options["batch_size"], rate=_share(options["rate"], count),
            max_batches=options["max_batches"], partition=(index, count), bar=bar, progress=False,
        )  # fmt: skip
        return {"reencrypted": report.reencrypted, "failures": report.failures, "reindexed": report.reindexed,
                "stopped": report.stopped, "kms_calls": keys.provider_calls}  # fmt: skip
    finally:
        engine.dispose()


def reencrypt_in_processes(keys: KeyManager, options: dict[str, Any], workers: int) -> tuple[ReencryptReport, int]:
    """The re-encryption by ``workers`` processes; (its report, KMS calls of all of them).

    ``options["table"]`` (with ``indexes``, the raw ``--index`` specs, and
    ``not_indexed``) names a blind-index key's table: each worker declares
    its columns from them and moves its partition of the digests and of the
    search-index tokens; else ``names`` are the encrypted columns to move."""
    columns = moved_columns_of(keys, keys.store.engine, options)
    store, live = keys.store, keys.live
    record = prepare_move(store, live, columns, options["key"])
    if options.get("table") is None:
        options = {**options, "names": [c.name for c in columns]}  # the same columns in every worker
    report = ReencryptReport(key_id=options["key"])
    with store.engine.connect() as conn:
        total = sum(count_left(conn, c, record.id) for c in moved_columns(columns, record))
    # a blind-index key's search indexes are rebuilt whatever the digests: their tokens have no header to count
    start = not already_moved(record) and (total or record.scope == kt.SCOPE_BLIND_INDEX)
    kms = 0
    with progress_bar(total, f"re-encrypt {record.owner_table}", None) as bar:
        for result in run_processes(_reencrypt_child, (options,), workers, bar) if start else []:
            kms += result["kms_calls"]
            seen = set(map(tuple, report.failures))
            report.add(result["reencrypted"], [tuple(f) for f in result["failures"] if tuple(f) not in seen])
            report.reindexed += result["reindexed"]
            report.stopped = report.stopped or result["stopped"]
    conclude(store, live, columns, record, report)
    return report, kms + keys.provider_calls


# -- backfill -----------------------------------------------------------------------------------

TYPES: dict[str, Any] = {
    "string": String,
    "text": Text,
    "int": Integer,
    "bigint": BigInteger,
    "float": Float,
    "numeric": Numeric,
    "bool": Boolean,
    "date": Date,
    "datetime": DateTime,
    "json": JSON,
}


def column_type(options: dict[str, Any], engine: Any) -> tuple[KeyManager, EncryptedType]:
    """The KeyManager and the column's EncryptedType, as the command's options declare them."""
    plaintext = options["column"] if options["direction"] == "encrypt" else options["shadow"]
    table = options["table"]
    inner = (
        TYPES[options["type"]]()
        if options["type"]
        else Table(table, MetaData(), autoload_with=engine).c[plaintext].type
    )
    keys = KeyManager(engine, provider_from_spec(options["cmk"] or ""))
    enc = EncryptedType(inner, keys, scope=options["scope"], deterministic=options["deterministic"],
                        context=options["context"] or f"{table}.{options['column']}")  # fmt: skip
    return keys, enc


def _backfill_child(options: dict[str, Any], *, index: int, count: int, bar: Any) -> dict[str, Any]:
    """One worker process of ``encrypt-column`` / ``decrypt-column``: claims ranges until none is left."""
    engine = create_engine(options["database_url"])
    try:
        keys, enc = column_type(options, engine)
        report = backfill(
            keys.store, enc, options["table"], options["column"], options["shadow"], direction=options["direction"],
            batch_size=options["batch"], rate=_share(options["rate"], count), lease=options["lease"],
            chunk=options["chunk"], bar=bar, progress=False,
        )  # fmt: skip
        return {"written": report.written, "conceded": report.conceded, "ranges": report.ranges,
                "kms_calls": keys.provider_calls}  # fmt: skip
    finally:
        engine.dispose()


def backfill_in_processes(
    keys: KeyManager, enc: EncryptedType, options: dict[str, Any], workers: int
) -> tuple[BackfillReport, int]:
    """The backfill by ``workers`` processes; (the report, KMS calls of all of them)."""
    args = (options["table"], options["column"], options["shadow"])
    total = plan_backfill(
        keys.store, enc, *args, direction=options["direction"], batch_size=options["batch"],
        lease=options["lease"], chunk=options["chunk"], restart=options["restart"],
    )  # fmt: skip
    report = BackfillReport(options["table"], options["column"], options["direction"])
    kms = 0
    with progress_bar(total, f"{options['direction']}-column {options['table']}.{options['column']}", None) as bar:
        # nothing left (a rerun after completion): no worker to start, no key to unwrap
        for result in run_processes(_backfill_child, ({**options, "restart": False},), workers, bar) if total else []:
            report.written += result["written"]
            report.conceded += result["conceded"]
            report.ranges.update(result["ranges"])
            kms += result["kms_calls"]
    return report, kms + keys.provider_calls
