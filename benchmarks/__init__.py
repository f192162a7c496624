"""Benchmarks of sa-envelope side by side with its peers, reported as ratios.

Run with ``python -m benchmarks`` (or ``make bench``); ``--help`` lists the
options and ``benchmarks/README.md`` explains the methodology. Nothing here
is imported by the package or by its tests, except the smoke test that keeps
the harness from rotting.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point (imported lazily so ``import benchmarks`` stays cheap)."""
    from ._cli import main as run

    return run(argv)
