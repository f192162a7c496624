"""How much faster two processes finish than one on this machine, with no database.

``python -m benchmarks.cpu_ceiling [--units N] [--rounds R]``

Issue 16 asks for 2 re-encryption workers at >= 1.6x one worker "on 2
cores". That presumes 2 cores give about 2x the work of one. On a virtual
machine they may not: two vCPUs can share one physical core (SMT siblings on
the host) or contend for its caches, and then every process runs slower while
the other runs. This measures that ceiling directly, with no database and no
sa-envelope code: a fixed amount of Python work shaped like a worker's
(AES-GCM seals of 80-byte values, dict and bytes handling), run once in one
process, then twice at the same time in two processes. It reports the wall
time of each, the two-process speed-up (2 x one / both) and how much more CPU
each process spent on the same work while the other ran (CPU inflation).
A re-encryption job cannot scale better than this ceiling; the workers'
figures (``benchmarks.workers_cpu``) are read against it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["main"]


def _work(units: int) -> tuple[float, float]:
    """Do ``units`` rows' worth of worker-shaped work; return (wall, cpu) seconds."""
    aead = AESGCM(os.urandom(32))
    value = os.urandom(80)
    aad = b"table\x00column\x00key-id"
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    out: list[Any] = []
    for i in range(units):
        nonce = os.urandom(12)
        sealed = aead.encrypt(nonce, value, aad)
        row = {"id": i, "value": b"\x01" + nonce + sealed, "old": value}
        out.append((row["id"], row["value"][:16], len(row["old"])))
        if len(out) >= 1000:
            out.clear()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def _run(processes: int, units: int) -> list[tuple[float, float]]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        pool.map(_work, [1000] * processes)  # warm both interpreters first
        return pool.map(_work, [units] * processes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=600_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    rounds = []
    for _ in range(args.rounds):
        one = _run(1, args.units)[0]
        two = _run(2, args.units)
        both_wall = max(w for w, _ in two)
        rounds.append(
            {
                "one_wall": one[0],
                "one_cpu": one[1],
                "two_wall": both_wall,
                "two_cpu": [c for _, c in two],
                "speedup": 2 * one[0] / both_wall,
                "cpu_inflation": statistics.mean(c for _, c in two) / one[1],
            }
        )
    print(f"load average before: {os.getloadavg()}")
    print("| round | 1 process wall s | 2 processes wall s | speed-up | CPU per process, 2 vs 1 |")
    print("|---|---:|---:|---:|---:|")
    for i, r in enumerate(rounds):
        print(f"| {i} | {r['one_wall']:.2f} | {r['two_wall']:.2f} | {r['speedup']:.2f}x | {r['cpu_inflation']:.2f}x |")
    med = statistics.median(r["speedup"] for r in rounds)
    print(f"median speed-up of 2 processes over 1: {med:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"units": args.units, "rounds": rounds}, fh, indent=1)


if __name__ == "__main__":
    main()
