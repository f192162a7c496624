"""The ``sa-envelope`` command line. A leaf: nothing in the package imports it.

Each subcommand registers itself in :data:`COMMANDS` through
:func:`command`; ``main`` turns any :class:`EnvelopeError`, bad argument or
database failure into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError

from ._errors import EnvelopeError

__all__ = ["COMMANDS", "command", "main"]

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str) -> Callable[[Callable[[argparse.ArgumentParser], None]], Callable[[argparse.ArgumentParser], None]]:
    """Register ``configure(parser)``; it must set ``parser.set_defaults(run=...)``."""

    def register(configure: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
        COMMANDS[name] = (configure, lambda ns: ns.run(ns), help)
        return configure

    return register


@command("demo", "encrypt a few rows in SQLite with a local key file and show them")
def _demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="sa_envelope_demo", help="working folder (default ./sa_envelope_demo)")

    def run(ns: argparse.Namespace) -> int:
        from ._demo import run_demo

        return run_demo(ns.dir)

    parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sa-envelope", description="Envelope encryption for SQLAlchemy columns.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, _, help_text) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m sa_envelope``."""
    _load_plugins()
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.run(ns) or 0)
    except EnvelopeError as exc:
        print(f"sa-envelope: error: {exc}", file=sys.stderr)
    except SQLAlchemyError as exc:
        print(f"sa-envelope: database error: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"sa-envelope: error: {exc}", file=sys.stderr)
    return 1


def _load_plugins() -> None:
    """Import the modules that register further subcommands."""
    import importlib

    for module in ("sa_envelope._cli_keys",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
