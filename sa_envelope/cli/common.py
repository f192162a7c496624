"""What every subcommand shares: its options, the engine, the provider, the report.

CMKs are given as for Alembic: a KMS key ARN, key id or alias, or
``local:PATH``; database URLs and CMKs default to the environment variables
``SA_ENVELOPE_DATABASE_URL``, ``SA_ENVELOPE_CMK`` and ``SA_ENVELOPE_SOURCE_CMK``.
A report goes to stdout as text lines, or with ``--json`` as one JSON
object (ASCII only, so nothing from the database can drive the terminal);
notes for the operator go to stderr, so that stdout stays parseable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Iterable

from sqlalchemy import Engine, MetaData, create_engine, make_url, select
from sqlalchemy.exc import ArgumentError

from ..errors import ConfigurationError
from ..keys import table as kt
from ..keys.live import DEFAULT_GRACE, DEFAULT_TTL, LivePolicy
from ..manager import KeyManager
from ..providers.base import KeyProvider
from ..providers.spec import provider_from_spec
from .output import escape, say

__all__ = [
    "Configure",
    "RESUMES",
    "STARTS_OVER",
    "cmk_option",
    "database_option",
    "emit",
    "grace_option",
    "engine_of",
    "json_option",
    "key_records",
    "manager",
    "one_line_errors",
    "pk_option",
    "provider_of",
]

Configure = Callable[[argparse.ArgumentParser], None]

# What Ctrl-C says, per command (``set_defaults(interrupted=...)``)
RESUMES = "every batch committed so far is kept: run the same command again to resume where it stopped"
STARTS_OVER = "nothing was changed: run the same command again to start over"


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """A bad argument prints one line (not argparse's usage block) and exits 2."""

    def error(message: str) -> Any:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")


def database_option(parser: argparse.ArgumentParser, *, report: bool = True) -> None:
    """``--database-url`` (alias ``--url``), and ``--json`` for a command that
    reports: every command's one database option; :func:`engine_of` reads it."""
    one_line_errors(parser)
    parser.add_argument(
        "--database-url",
        "--url",
        default=os.environ.get("SA_ENVELOPE_DATABASE_URL"),
        help="SQLAlchemy URL (default $SA_ENVELOPE_DATABASE_URL)",
    )
    if report:
        json_option(parser)


def cmk_option(parser: argparse.ArgumentParser, what: str = "unwraps the keys") -> None:
    parser.add_argument(
        "--cmk",
        default=os.environ.get("SA_ENVELOPE_CMK"),
        help=f"provider that {what}: KMS key ARN, key id, alias, or local:PATH (default $SA_ENVELOPE_CMK; "
        "without it, the CMK of the oldest KMS-wrapped key)",
    )


def engine_of(ns: argparse.Namespace, **engine_options: Any) -> Engine:
    """The engine of ``--database-url`` (``engine_options`` go to
    ``create_engine``); a missing driver is one line, not a traceback."""
    if not ns.database_url:
        raise ConfigurationError("no database: pass --database-url or set SA_ENVELOPE_DATABASE_URL")
    try:
        url = make_url(ns.database_url)
    except ArgumentError:
        raise ConfigurationError("--database-url is not a SQLAlchemy URL (dialect+driver://user@host/db)") from None
    try:
        return create_engine(url, **engine_options)
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver of {url.drivername} is not installed ({exc}): pip install it"
        ) from None


def key_records(engine: Engine) -> list[Any]:
    table = kt.key_table(MetaData())
    with engine.connect() as conn:
        return list(conn.execute(select(table).order_by(table.c.owner_table, table.c.created_at)))


def provider_of(ns: argparse.Namespace, engine: Engine) -> KeyProvider:
    """``--cmk``, or without it the CMK of the oldest KMS-wrapped key, and only
    it, is trusted (the key table is no authority: pass --cmk to check
    against the CMK the application is configured with)."""
    if ns.cmk:
        return provider_from_spec(ns.cmk)
    records = sorted(key_records(engine), key=lambda r: (r.created_at, r.id))
    for record in records:
        if record.parent_id is None and str(record.wrapping_key_id).startswith("arn:aws"):
            say(f"no --cmk given: trusting {escape(record.wrapping_key_id)}, the CMK of the oldest key", sys.stderr)
            ns.cmk = record.wrapping_key_id  # what the command's worker processes are given, said once
            return provider_from_spec(record.wrapping_key_id)
    raise ConfigurationError("no KMS-wrapped key found: pass --cmk local:PATH (or set SA_ENVELOPE_CMK)")


def manager(ns: argparse.Namespace, engine: Engine) -> KeyManager:
    grace = getattr(ns, "grace", None)
    live = LivePolicy(ttl=min(DEFAULT_TTL, grace / 2), grace=grace) if grace is not None else None
    return KeyManager(engine, provider_of(ns, engine), live=live)


def grace_option(parser: argparse.ArgumentParser) -> None:
    """The application's ``LivePolicy.grace`` (a deterministic or blind-index key's move waits for it)."""
    parser.add_argument(
        "--grace",
        type=float,
        help=f"the application's LivePolicy.grace in seconds (default {DEFAULT_GRACE:g}); never less than the "
        "application's, or values written meanwhile stay under the old key",
    )


def pk_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--pk``: one row's primary key, the one syntax of every command that takes one."""
    parser.add_argument(
        "--pk",
        action="append",
        metavar="[NAME=]VALUE",
        help=f"{what}: --pk VALUE for a one-column primary key; --pk NAME=VALUE once per column of a "
        "composite one (--pk a=3 --pk b=7)",
    )


def emit(ns: argparse.Namespace, data: dict[str, Any], lines: Iterable[Any]) -> None:
    """The command's report: ``lines`` as text, or ``data`` as JSON with ``--json``."""
    if getattr(ns, "json", False):
        print(json.dumps({"command": ns.command_name, **data}, default=str))
        return
    for line in lines:
        say(line)
