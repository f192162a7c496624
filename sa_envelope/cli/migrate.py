"""``sa-envelope encrypt-column`` / ``decrypt-column``: the online backfill, outside a migration.

Between the expand and the contract of an online migration
(docs/migrations.md), these fill the shadow column of a large table while
the application keeps writing: ``--workers`` processes here
(:mod:`.workers`), and as many more on other hosts as you start, share the
table through claimed primary-key ranges in ``sa_envelope_claims``;
``--rate`` caps this command's rows per second (shared out among its
processes); a rerun resumes (or, once done, does nothing).
The column's type is reflected from the plaintext column (``--type``
overrides it where reflection cannot tell, e.g. JSON stored as text).
"""

from __future__ import annotations

import argparse
import os
from typing import Any


from ..errors import ConfigurationError
from ..jobs.backfill import backfill
from .common import RESUMES, database_option, engine_of
from .output import escape, say
from .workers import TYPES, backfill_in_processes, column_type

__all__ = ["MIGRATE_COMMANDS"]

SUFFIX = {"encrypt": "__encrypted", "decrypt": "__plaintext"}  # as sa_envelope.alembic.online
# what a worker process needs to rebuild the job (plain values only)
OPTIONS = ("database_url", "table", "column", "scope", "deterministic", "context", "type", "cmk", "rate", "batch",
           "chunk", "lease", "restart")  # fmt: skip


def _options(parser: argparse.ArgumentParser, direction: str) -> None:
    database_option(parser, report=False)
    add = parser.add_argument
    add("--table", required=True)
    add("--column", required=True, help="the column's name (the plaintext one while encrypting)")
    add("--shadow", help=f"the shadow column (default COLUMN{SUFFIX[direction]})")
    add("--deterministic", action="store_true", help="the column is EncryptedType(..., deterministic=True)")
    add("--scope", choices=("table", "row"), default="table", help="the column's scope= (default table)")
    add("--context", help="the column's pinned context=, if the model pins one (default TABLE.COLUMN)")
    add("--type", choices=sorted(TYPES), help="the column's inner type (default: reflected)")
    add("--cmk", default=os.environ.get("SA_ENVELOPE_CMK"), help="KMS key or local:PATH (default $SA_ENVELOPE_CMK)")
    add("--workers", type=int, default=1, help="worker processes of this command (default 1)")
    add("--rate", type=float, help="at most this many rows per second for this command")
    add("--batch", "--batch-size", dest="batch", type=int, default=500, help="rows per transaction (default 500)")
    add("--chunk", type=int, help="primary-key span of one claimed range (default 20 batches)")
    add("--lease", type=float, default=60.0, help="seconds a dead worker's range stays claimed (default 60)")
    add("--restart", action="store_true", help="forget earlier progress and check every row again")
    parser.set_defaults(run=lambda ns: _run(ns, direction), interrupted=RESUMES)


def _run(ns: argparse.Namespace, direction: str) -> int:
    if ns.workers < 1 or ns.batch < 1:
        raise ConfigurationError("--workers and --batch must be at least 1")
    engine = engine_of(ns, pool_size=max(5, ns.workers + 2))
    options = {name: getattr(ns, name) for name in OPTIONS}
    options |= {"direction": direction, "shadow": ns.shadow or ns.column + SUFFIX[direction]}
    workers = 1 if engine.dialect.name == "sqlite" else ns.workers  # SQLite has one writer
    try:
        keys, enc = column_type(options, engine)
        keys.create_table()  # normally there already (the application made it)
        if workers > 1:
            report, calls = backfill_in_processes(keys, enc, options, workers)
        else:
            report = backfill(
                keys.store, enc, ns.table, ns.column, options["shadow"], direction=direction, batch_size=ns.batch,
                rate=ns.rate, lease=ns.lease, chunk=ns.chunk, restart=ns.restart,
            )  # fmt: skip
            calls = keys.provider_calls
        say(escape(str(report)))
        say(f"KMS calls: {calls}")
    finally:
        engine.dispose()
    return 0


MIGRATE_COMMANDS: tuple[tuple[str, Any, str], ...] = (
    ("encrypt-column", lambda p: _options(p, "encrypt"), "fill an encrypted shadow column online (docs/migrations.md)"),
    ("decrypt-column", lambda p: _options(p, "decrypt"), "fill a plaintext shadow column online (the reverse)"),
)
