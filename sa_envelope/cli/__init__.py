"""The ``sa-envelope`` command line. A leaf: nothing in the package imports it.

The subcommands live by concern: :mod:`.keys` (``keys list``, ``keys
sweep``, ``rotate``, ``shred``, ``sweep-guards``), :mod:`.data` (``rewrap``, ``verify``,
``reencrypt``, ``export``), :mod:`.migrate` (``encrypt-column``,
``decrypt-column``), :mod:`.demo`; what they share is in
:mod:`.common`. A new command is one more ``(name, configure, help)`` entry
in a module's ``COMMANDS`` tuple. ``main`` turns any :class:`EnvelopeError`,
bad argument, missing driver or database failure into one line on stderr
and a non-zero exit, and Ctrl-C into one line saying whether a rerun
resumes (exit 130).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

from sqlalchemy.exc import SQLAlchemyError

from ..errors import EnvelopeError
from . import data, keys
from .common import STARTS_OVER, Configure, one_line_errors
from .demo import run_demo
from .migrate import MIGRATE_COMMANDS
from .output import escape, say

__all__ = ["COMMANDS", "build_parser", "main"]

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="sa_envelope_demo", help="working folder (default ./sa_envelope_demo)")
    parser.set_defaults(run=lambda ns: run_demo(ns.dir), interrupted="run it again: the demo starts afresh")


COMMANDS: tuple[tuple[str, Configure, str], ...] = (
    ("demo", _demo, "encrypt a few rows in SQLite with a local key file and show them"),
    *keys.COMMANDS,
    *data.COMMANDS,
    *MIGRATE_COMMANDS,
)


def _version() -> str:
    try:
        return version("sa-envelope")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa-envelope", description="Envelope encryption for SQLAlchemy columns.")
    one_line_errors(parser)
    parser.add_argument("--version", action="version", version=f"sa-envelope {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, configure, help_text in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(command_name=name, interrupted=STARTS_OVER)  # a command that writes says more
        configure(command)
    return parser


def _fail(ns: argparse.Namespace, message: str) -> int:
    say(f"sa-envelope: {message}", file=sys.stderr)
    if getattr(ns, "json", False):
        print(json.dumps({"command": ns.command_name, "error": message}))
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m sa_envelope``."""
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.run(ns) or 0)
    except KeyboardInterrupt:
        say(f"sa-envelope: interrupted: {ns.interrupted}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # stdout's reader left (| head): nothing more to say, and no flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (EnvelopeError, SQLAlchemyError, OSError, ValueError) as exc:
        if _after_interrupt(exc):  # a clean-up that failed because Ctrl-C cut a query short
            say(f"sa-envelope: interrupted: {ns.interrupted}", file=sys.stderr)
            return INTERRUPTED
        if isinstance(exc, SQLAlchemyError) and not isinstance(exc, EnvelopeError):
            first = str(exc).splitlines()[0] if str(exc) else ""
            return _fail(ns, f"database error: {type(exc).__name__}: {escape(first)}")
        return _fail(ns, f"error: {escape(exc)}")


def _after_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a KeyboardInterrupt."""
    seen: BaseException | None = exc.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
