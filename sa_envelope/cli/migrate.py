"""``sa-envelope encrypt-column`` / ``decrypt-column``: the online backfill, outside a migration.

Between the expand and the contract of an online migration
(docs/migrations.md), these fill the shadow column of a large table while
the application keeps writing: ``--workers`` threads here, and as many
processes on other hosts as you start, share the table through claimed
primary-key ranges in ``sa_envelope_claims``; ``--rate`` caps this
process's rows per second; a rerun resumes (or, once done, does nothing).
The column's type is reflected from the plaintext column (``--type``
overrides it where reflection cannot tell, e.g. JSON stored as text).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Date, DateTime, Float, Integer, MetaData, Numeric, Table, Text
from sqlalchemy import String, create_engine

from ..columns.encrypted import EncryptedType
from ..errors import ConfigurationError
from ..jobs.backfill import backfill
from ..manager import KeyManager
from ..providers.spec import provider_from_spec
from .common import RESUMES, one_line_errors
from .output import escape, say

__all__ = ["MIGRATE_COMMANDS"]

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
SUFFIX = {"encrypt": "__encrypted", "decrypt": "__plaintext"}  # as sa_envelope.alembic.online


def _options(parser: argparse.ArgumentParser, direction: str) -> None:
    one_line_errors(parser)
    add = parser.add_argument
    add("--database-url", "--url", default=os.environ.get("SA_ENVELOPE_DATABASE_URL"), help="SQLAlchemy URL")
    add("--table", required=True)
    add("--column", required=True, help="the column's name (the plaintext one while encrypting)")
    add("--shadow", help=f"the shadow column (default COLUMN{SUFFIX[direction]})")
    add("--deterministic", action="store_true", help="the column is EncryptedType(..., deterministic=True)")
    add("--scope", choices=("table", "row"), default="table", help="the column's scope= (default table)")
    add("--context", help="the column's pinned context=, if the model pins one (default TABLE.COLUMN)")
    add("--type", choices=sorted(TYPES), help="the column's inner type (default: reflected)")
    add("--cmk", default=os.environ.get("SA_ENVELOPE_CMK"), help="KMS key or local:PATH (default $SA_ENVELOPE_CMK)")
    add("--workers", type=int, default=1, help="threads in this process (default 1)")
    add("--rate", type=float, help="at most this many rows per second in this process")
    add("--batch", "--batch-size", dest="batch", type=int, default=500, help="rows per transaction (default 500)")
    add("--chunk", type=int, help="primary-key span of one claimed range (default 20 batches)")
    add("--lease", type=float, default=60.0, help="seconds a dead worker's range stays claimed (default 60)")
    add("--restart", action="store_true", help="forget earlier progress and check every row again")
    parser.set_defaults(run=lambda ns: _run(ns, direction), interrupted=RESUMES)


def _run(ns: argparse.Namespace, direction: str) -> int:
    if not ns.database_url:
        raise ConfigurationError("no database: pass --database-url or set SA_ENVELOPE_DATABASE_URL")
    if ns.workers < 1 or ns.batch < 1:
        raise ConfigurationError("--workers and --batch must be at least 1")
    engine = create_engine(ns.database_url, pool_size=max(5, ns.workers + 2))
    try:
        shadow = ns.shadow or ns.column + SUFFIX[direction]
        plaintext = ns.column if direction == "encrypt" else shadow
        inner = TYPES[ns.type]() if ns.type else Table(ns.table, MetaData(), autoload_with=engine).c[plaintext].type
        keys = KeyManager(engine, provider_from_spec(ns.cmk or ""))
        keys.create_table()  # normally there already (the application made it)
        enc = EncryptedType(
            inner, keys, scope=ns.scope, deterministic=ns.deterministic, context=ns.context or f"{ns.table}.{ns.column}"
        )
        report = backfill(
            keys.store,
            enc,
            ns.table,
            ns.column,
            shadow,
            direction=direction,
            batch_size=ns.batch,
            workers=ns.workers,
            rate=ns.rate,
            lease=ns.lease,
            chunk=ns.chunk,
            restart=ns.restart,
        )
        say(escape(str(report)))
        say(f"KMS calls: {keys.provider_calls}")
    finally:
        engine.dispose()
    return 0


MIGRATE_COMMANDS: tuple[tuple[str, Any, str], ...] = (
    ("encrypt-column", lambda p: _options(p, "encrypt"), "fill an encrypted shadow column online (docs/migrations.md)"),
    ("decrypt-column", lambda p: _options(p, "decrypt"), "fill a plaintext shadow column online (the reverse)"),
)
