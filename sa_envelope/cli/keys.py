"""The key-table commands: ``keys list``, ``keys sweep``, ``rotate``, ``shred``, ``sweep-guards``.

Each is a ``configure(parser)`` function that adds its options and sets
``parser.set_defaults(run=..., interrupted=...)``; :data:`COMMANDS` lists
them in the order ``--help`` shows them.
"""

from __future__ import annotations

import argparse

from sqlalchemy import MetaData

from ..envelope import format as fmt
from ..errors import ConfigurationError
from ..jobs import scan
from ..jobs.guardsweep import sweep_guards
from ..keys import table as kt
from .common import (
    RESUMES,
    STARTS_OVER,
    Configure,
    cmk_option,
    database_option,
    emit,
    engine_of,
    key_records,
    manager,
    one_line_errors,
    pk_option,
)
from .output import escape

__all__ = ["COMMANDS"]


def _keys(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser)
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{list,sweep}")
    for name, configure, help_text in (
        ("list", _list, "list every key: id, scope, table, status, wrapping key"),
        ("sweep", _sweep, "find row keys whose row is gone; shred them with --apply"),
    ):
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command_name=f"keys {name}")
        configure(command)


def _list(parser: argparse.ArgumentParser) -> None:
    database_option(parser)

    def run(ns: argparse.Namespace) -> int:
        engine = engine_of(ns)
        try:
            rows = key_records(engine)
        finally:
            engine.dispose()
        keys = [
            {
                "id": fmt.format_key_id(r.id),
                "scope": r.scope,
                "table": r.owner_table,
                "status": r.status,
                "parent": fmt.format_key_id(r.parent_id) if r.parent_id else None,
                "wrapped_by": r.wrapping_key_id,
                "created_at": r.created_at,
            }
            for r in rows
        ]
        lines = [f"{'KEY ID':16}  {'SCOPE':13}  {'TABLE':20}  {'STATUS':8}  {'PARENT':16}  WRAPPED BY"]
        for k in keys:
            scope, owner, status, wrapped_by = (escape(k[n]) for n in ("scope", "table", "status", "wrapped_by"))
            lines.append(f"{k['id']:16}  {scope:13}  {owner:20}  {status:8}  {k['parent'] or '-':16}  {wrapped_by}")
        emit(ns, {"keys": keys}, lines)
        return 0

    parser.set_defaults(run=run, interrupted=STARTS_OVER)


def _sweep(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--apply", action="store_true", help="shred the orphaned keys (default: count them only)")
    cmk_option(parser, "unwraps the table keys")
    parser.add_argument("--batch-size", type=int, default=500, help="keys per transaction (default 500)")

    def run(ns: argparse.Namespace) -> int:
        engine = engine_of(ns)
        try:
            report = manager(ns, engine).sweep_orphans(dry_run=not ns.apply, batch_size=ns.batch_size)
        finally:
            engine.dispose()
        data = {"found": report.found, "shredded": report.shredded, "tables": report.tables}
        emit(ns, data | {"dry_run": report.dry_run, "missing_tables": report.missing}, [report])
        return 0

    parser.set_defaults(run=run, interrupted=RESUMES)


def _rotate(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--table", required=True, help="the table whose key rolls over")
    parser.add_argument(
        "--scope",
        choices=(kt.SCOPE_TABLE, kt.SCOPE_DETERMINISTIC, kt.SCOPE_BLIND_INDEX),
        default=kt.SCOPE_TABLE,
        help="which of the table's keys (default table); a deterministic or blind-index key is matched by "
        "queries at once and written under after the application's LivePolicy.grace",
    )
    cmk_option(parser, "wraps the new key")

    def run(ns: argparse.Namespace) -> int:
        engine = engine_of(ns)
        try:
            key_id = fmt.format_key_id(manager(ns, engine).rotate_table_key(ns.table, ns.scope))
        finally:
            engine.dispose()
        line = (
            f"table {ns.table}: new {ns.scope} key {key_id}; older keys stay for reading "
            "(sa-envelope reencrypt --key OLD moves values off one)"
        )
        emit(ns, {"table": ns.table, "scope": ns.scope, "key": key_id}, [line])
        return 0

    parser.set_defaults(run=run, interrupted=STARTS_OVER)


def _shred(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--key", help="a row key id, as keys list shows it")
    parser.add_argument("--table", help="with --pk: shred every key the row of this table ever had")
    pk_option(parser, "the row")
    parser.add_argument("--yes", action="store_true", help="confirm: the values under the keys are gone for good")
    cmk_option(parser, "unwraps the table keys")

    def run(ns: argparse.Namespace) -> int:
        if bool(ns.key) == bool(ns.table or ns.pk is not None) or bool(ns.table) != (ns.pk is not None):
            raise ConfigurationError("shred takes either --key KEY or --table TABLE --pk [NAME=]VALUE ...")
        if not ns.yes:
            raise ConfigurationError("shredding destroys the values under the keys for good: add --yes")
        engine = engine_of(ns)
        try:
            keys = manager(ns, engine)
            if ns.key:
                keys.shred_key(_key_id(ns.key))
                shredded, where = [fmt.format_key_id(_key_id(ns.key))], f"key {ns.key}"
            else:
                with engine.connect() as conn:
                    table = scan.reflect(conn, ns.table)
                pk = scan.primary_key(table, ns.pk)
                shredded = keys.shred_row(ns.table, pk)
                where = f"row {scan.pk_text(list(table.primary_key.columns), pk)} of {ns.table}"
        finally:
            engine.dispose()
        line = f"shredded {len(shredded)} keys of {where}: {', '.join(shredded) or 'none'}"
        emit(ns, {"shredded": shredded}, [line])
        return 0

    parser.set_defaults(run=run, interrupted="the shred commits in one transaction: run it again to be sure")


def _sweep_guards(parser: argparse.ArgumentParser) -> None:
    database_option(parser)
    parser.add_argument("--table", help="only this table's guards (default: every table's)")
    parser.add_argument("--dry-run", action="store_true", help="count the guards it would remove, remove none")

    def run(ns: argparse.Namespace) -> int:
        engine = engine_of(ns)  # the key rows are read, never unwrapped: no --cmk
        try:
            report = sweep_guards(engine, kt.key_table(MetaData()), ns.table, dry_run=ns.dry_run)
        finally:
            engine.dispose()
        lines = [report, *(f"  {escape(t)}: {n}" for t, n in report.removed.items())]
        data = {"removed": report.removed, "kept": report.kept, "total": report.total, "dry_run": report.dry_run}
        emit(ns, data, lines)
        return 0

    parser.set_defaults(run=run, interrupted=RESUMES)


def _key_id(text: str) -> int:
    try:
        return fmt.parse_key_id(text)
    except ValueError:
        raise ConfigurationError(f"{text!r} is not a key id (16 hex digits, as keys list shows)") from None


COMMANDS: tuple[tuple[str, Configure, str], ...] = (
    ("keys", _keys, "inspect the key table (keys list), shred orphaned row keys (keys sweep)"),
    ("rotate", _rotate, "roll a table key over now: new values use a new key, old ones stay readable"),
    ("shred", _shred, "crypto-shred a row key (--key) or every key of one row (--table, --pk)"),
    ("sweep-guards", _sweep_guards, "remove the uniqueness guard rows no rotation in progress needs"),
)
