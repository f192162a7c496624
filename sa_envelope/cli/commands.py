"""The CLI's subcommands: ``keys list``, ``keys sweep``, ``rewrap``, ``verify``, ``demo``.

Each is a ``configure(parser)`` function that adds its options and sets
``parser.set_defaults(run=...)``; :data:`COMMANDS` lists them in the order
``--help`` shows them. CMKs are given as for Alembic: a KMS key ARN, key id or alias,
or ``local:PATH``; database URLs and CMKs default to the environment
variables ``SA_ENVELOPE_DATABASE_URL``, ``SA_ENVELOPE_CMK`` and
``SA_ENVELOPE_SOURCE_CMK``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from sqlalchemy import MetaData, create_engine, select

from ..envelope import format as fmt
from ..errors import ConfigurationError
from ..jobs.verify import verify_database
from ..keys import table as kt
from ..manager import KeyManager
from ..providers.base import KeyProvider
from ..providers.spec import provider_from_spec
from .demo import run_demo
from .output import escape, say

__all__ = ["COMMANDS"]

Configure = Callable[[argparse.ArgumentParser], None]


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """A bad argument prints one line (not argparse's usage block) and exits 2."""

    def error(message: str) -> Any:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]


def _database_option(parser: argparse.ArgumentParser) -> None:
    _one_line_errors(parser)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("SA_ENVELOPE_DATABASE_URL"),
        help="SQLAlchemy URL (default $SA_ENVELOPE_DATABASE_URL)",
    )


def _engine(ns: argparse.Namespace) -> Any:
    if not ns.database_url:
        raise ConfigurationError("no database: pass --database-url or set SA_ENVELOPE_DATABASE_URL")
    return create_engine(ns.database_url)


def _records(engine: Any) -> list[Any]:
    table = kt.key_table(MetaData())
    with engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c.owner_table, table.c.created_at)))


def _keys(parser: argparse.ArgumentParser) -> None:
    _one_line_errors(parser)
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{list,sweep}")
    listing = sub.add_parser("list", help="list every key: id, scope, table, status, wrapping key")
    _database_option(listing)

    def run(ns: argparse.Namespace) -> int:
        engine = _engine(ns)
        try:
            rows = _records(engine)
        finally:
            engine.dispose()
        say(f"{'KEY ID':16}  {'SCOPE':13}  {'TABLE':20}  {'STATUS':8}  {'PARENT':16}  WRAPPED BY")
        for r in rows:
            parent = fmt.format_key_id(r.parent_id) if r.parent_id else "-"
            scope, owner, status, wrapped_by = (
                escape(v) for v in (r.scope, r.owner_table, r.status, r.wrapping_key_id)
            )
            say(f"{fmt.format_key_id(r.id):16}  {scope:13}  {owner:20}  {status:8}  {parent:16}  {wrapped_by}")
        return 0

    listing.set_defaults(run=run)
    _sweep(sub.add_parser("sweep", help="find row keys whose row is gone; shred them with --apply"))


def _sweep(parser: argparse.ArgumentParser) -> None:
    _database_option(parser)
    parser.add_argument("--apply", action="store_true", help="shred the orphaned keys (default: count them only)")
    parser.add_argument(
        "--cmk",
        default=os.environ.get("SA_ENVELOPE_CMK"),
        help="provider that unwraps the table keys (default $SA_ENVELOPE_CMK; KMS keys need none)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="keys per transaction (default 500)")

    def run(ns: argparse.Namespace) -> int:
        engine = _engine(ns)
        try:
            provider = provider_from_spec(ns.cmk) if ns.cmk else _inferred_provider(engine)
            report = KeyManager(engine, provider).sweep_orphans(dry_run=not ns.apply, batch_size=ns.batch_size)
        finally:
            engine.dispose()
        say(report)
        return 0

    parser.set_defaults(run=run)


def _inferred_provider(engine: Any) -> KeyProvider:
    """Without --cmk: the CMK of the oldest KMS-wrapped key, and only it, is
    trusted (the key table is no authority: pass --cmk to check against
    the CMK the application is configured with)."""
    records = sorted(_records(engine), key=lambda r: (r.created_at, r.id))
    for record in records:
        if record.parent_id is None and str(record.wrapping_key_id).startswith("arn:aws"):
            say(f"no --cmk given: trusting {escape(record.wrapping_key_id)}, the CMK of the oldest key")
            return provider_from_spec(record.wrapping_key_id)
    raise ConfigurationError("no KMS-wrapped key found: pass --cmk local:PATH (or set SA_ENVELOPE_CMK)")


def _rewrap(parser: argparse.ArgumentParser) -> None:
    _database_option(parser)
    parser.add_argument(
        "--to",
        default=os.environ.get("SA_ENVELOPE_CMK"),
        help="target CMK: KMS key ARN, key id, alias, or local:PATH (default $SA_ENVELOPE_CMK)",
    )
    parser.add_argument(
        "--from",
        dest="source",
        default=os.environ.get("SA_ENVELOPE_SOURCE_CMK"),
        help="CMK the keys are wrapped by now, e.g. alias/old or local:OLD.key: only it and "
        "the target are trusted (default $SA_ENVELOPE_SOURCE_CMK)",
    )
    parser.add_argument("--batch-size", type=int, default=100, help="keys per transaction (default 100)")

    def run(ns: argparse.Namespace) -> int:
        target = provider_from_spec(ns.to or "", check=True)
        source = provider_from_spec(ns.source) if ns.source else target
        engine = _engine(ns)
        try:
            report = KeyManager(engine, source).rewrap(target, batch_size=ns.batch_size)
        finally:
            engine.dispose()
        say(report)
        for key_id, reason in report.failures:
            say(f"  key {key_id}: {escape(reason)}")
        for key_id, wrapping_key_id in report.untrusted:
            say(f"  key {key_id}: wrapped by untrusted key {escape(wrapping_key_id)}, left as it is")
        return 0 if report.complete else 1

    parser.set_defaults(run=run)


def _verify(parser: argparse.ArgumentParser) -> None:
    _database_option(parser)
    parser.add_argument("--table", action="append", dest="tables", help="only this table (repeatable)")
    parser.add_argument(
        "--cmk",
        default=os.environ.get("SA_ENVELOPE_CMK"),
        help="provider that unwraps the keys (default $SA_ENVELOPE_CMK; KMS keys need none)",
    )

    def run(ns: argparse.Namespace) -> int:
        engine = _engine(ns)
        try:
            provider = provider_from_spec(ns.cmk) if ns.cmk else _inferred_provider(engine)
            report = verify_database(KeyManager(engine, provider).store, ns.tables)
        finally:
            engine.dispose()
        for line in report.lines():
            say(escape(line))
        say(f"verified {report.ok + report.failed} values: {report.ok} ok, {report.failed} failed")
        say(f"key table: {len(report.anomalies)} anomalies")
        return 1 if report.failed or report.anomalies else 0

    parser.set_defaults(run=run)


def _demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="sa_envelope_demo", help="working folder (default ./sa_envelope_demo)")
    parser.set_defaults(run=lambda ns: run_demo(ns.dir))


COMMANDS: tuple[tuple[str, Configure, str], ...] = (
    ("demo", _demo, "encrypt a few rows in SQLite with a local key file and show them"),
    ("keys", _keys, "inspect the key table (keys list), shred orphaned row keys (keys sweep)"),
    ("rewrap", _rewrap, "re-wrap every table key under another CMK (CMK rotation)"),
    ("verify", _verify, "try to decrypt every encrypted value; report failures by table, column and key"),
)
