"""The ``sa-envelope`` command line. A leaf: nothing in the package imports it.

The subcommands are in :mod:`.commands` (the demo's body in :mod:`.demo`);
``main`` turns any :class:`EnvelopeError`, bad argument or database failure
into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sqlalchemy.exc import SQLAlchemyError

from ..errors import EnvelopeError
from .commands import COMMANDS
from .migrate import MIGRATE_COMMANDS
from .output import escape, say

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa-envelope", description="Envelope encryption for SQLAlchemy columns.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, configure, help_text in (*COMMANDS, *MIGRATE_COMMANDS):
        configure(sub.add_parser(name, help=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m sa_envelope``."""
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.run(ns) or 0)
    except EnvelopeError as exc:
        say(f"sa-envelope: error: {escape(exc)}", file=sys.stderr)
    except SQLAlchemyError as exc:
        say(f"sa-envelope: database error: {type(exc).__name__}: {escape(str(exc).splitlines()[0])}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        say(f"sa-envelope: error: {escape(exc)}", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
