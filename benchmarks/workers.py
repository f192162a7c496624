"""Re-encryption with 1 and 2 worker processes, interleaved round by round (issue 16).

Not a test. ``python -m benchmarks.workers --url URL [--rows 300000]
[--rounds 5] [--against DIR] [--json FILE]``: each round runs ``sa-envelope
reencrypt`` (as :mod:`benchmarks.rotation` does: a fresh table of ``rows``
values under a rotated key, the command's start and its workers' start in
the time) with 1 worker and with 2, and with ``--against DIR`` also with 2
workers of another checkout of the project (``DIR``, for example a ``git
worktree`` of the previous commit: the command runs there, with its own
code). It prints each run, each round's ratios against the round's 1-worker
run, and the medians. The URL's database is emptied.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from .rotation import _kms, bench_reencrypt

HERE = Path(__file__).resolve().parent.parent


def _run(url: str, rows: int, client: Any, workers: int, checkout: Path) -> dict[str, Any]:
    """One ``sa-envelope reencrypt --workers N`` of ``checkout``'s code
    (``python -m`` puts the working directory first on sys.path)."""
    before = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(checkout)
    os.environ["PYTHONPATH"] = str(checkout)
    try:
        return bench_reencrypt(url, rows, client, workers=workers)
    finally:
        os.chdir(before[0])
        if before[1] is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="database URL (emptied!)")
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout whose 2 workers run in each round too")
    parser.add_argument("--json", help="append every run's figures to this file (JSON lines)")
    args = parser.parse_args()
    variants = {"1 worker": (1, HERE), "2 workers": (2, HERE)}
    if args.against:
        variants[f"2 workers of {args.against}"] = (2, args.against.resolve())
    server, client = _kms()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    try:
        for r in range(args.rounds):
            for name, (workers, checkout) in variants.items():
                out = _run(args.url, args.rows, client, workers, checkout) | {"round": r, "variant": name}
                runs[name].append(out)
                print(json.dumps(out), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(out) + "\n")
            one = runs["1 worker"][-1]["rows_per_second"]
            print(f"round {r}: " + ", ".join(f"{n} {runs[n][-1]['rows_per_second'] / one:.2f}x"
                                             for n in variants if n != "1 worker"), flush=True)  # fmt: skip
    finally:
        server.stop()
    medians = {n: statistics.median(x["rows_per_second"] for x in v) for n, v in runs.items()}
    one = medians["1 worker"]
    for name, rate in medians.items():
        rounds = [f"{x['rows_per_second'] / o['rows_per_second']:.2f}" for x, o in zip(runs[name], runs["1 worker"])]
        print(f"| {name} | {rate:,.0f} | {rate / one:.2f}x | {', '.join(rounds)} |")


if __name__ == "__main__":
    main()
