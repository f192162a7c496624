"""Interleaved rounds: the one timing discipline every section follows.

Timing several variants one after the other lets machine noise (another
process, a CPU frequency change, a checkpoint in the database) land on one
variant only. So every round runs every contender, in an order rotated by
one each round; garbage is collected before each timed step; a warm-up round
runs first and is thrown away; and a ratio is taken *within* a round (both
sides saw the same machine) before the median is taken over rounds.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Contender", "Timings", "run_interleaved"]

Step = tuple[str, Callable[[], object]]


@dataclass
class Contender:
    """One variant in a section: an untimed ``prepare`` and its timed steps.

    ``before`` maps a step name to untimed work run just before that step
    (emptying a key cache before a cold read, for instance)."""

    name: str
    steps: list[Step]
    prepare: Callable[[], object] = lambda: None
    before: dict[str, Callable[[], object]] = field(default_factory=dict)


@dataclass
class Timings:
    """Seconds per (contender, step), one entry per timed round, in round order.

    ``seconds`` is wall time, what every reported ratio uses. ``cpu`` is this
    process's CPU time over the same step: it leaves out the database
    server's work and time spent descheduled, so on a busy machine it tells
    client-side cost (where the variants differ) from noise.
    """

    rounds: int
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def median(self, name: str, step: str) -> float | None:
        values = self.seconds.get(name, {}).get(step)
        return statistics.median(values) if values else None

    def ratio(self, name: str, base: str, step: str, *, clock: str = "seconds") -> float | None:
        """Median over rounds of the within-round ratio ``name / base``."""
        series = self.cpu if clock == "cpu" else self.seconds
        a = series.get(name, {}).get(step)
        b = series.get(base, {}).get(step)
        if not a or not b or not all(b):
            return None
        return statistics.median(x / y for x, y in zip(a, b))

    def record(self, name: str, step: str, wall: float, cpu: float) -> None:
        self.seconds.setdefault(name, {}).setdefault(step, []).append(wall)
        self.cpu.setdefault(name, {}).setdefault(step, []).append(cpu)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Timings:
        return cls(rounds=raw["rounds"], seconds=raw["seconds"], cpu=raw.get("cpu", {}))

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "seconds": self.seconds, "cpu": self.cpu}


def _rotated(items: list[Contender], by: int) -> list[Contender]:
    if not items:
        return items
    k = by % len(items)
    return items[k:] + items[:k]


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def run_interleaved(contenders: list[Contender], *, rounds: int, warmup: int = 1) -> Timings:
    """Run ``warmup`` discarded rounds then ``rounds`` timed ones, interleaved."""
    timings = Timings(rounds=rounds)
    # Objects alive now (modules, boto3, moto, the prepared data) are not the
    # benchmark's garbage: freezing them keeps each gc.collect() short and
    # about what the previous step left behind.
    gc.collect()
    gc.freeze()
    try:
        _rounds(contenders, timings, rounds=rounds, warmup=warmup)
    finally:
        gc.unfreeze()
    return timings


def _rounds(contenders: list[Contender], timings: Timings, *, rounds: int, warmup: int) -> None:
    for round_no in range(warmup + rounds):
        for contender in _rotated(contenders, round_no):
            contender.prepare()
            for step, fn in contender.steps:
                if step in contender.before:
                    contender.before[step]()
                wall, cpu = _timed(fn)
                if round_no >= warmup:
                    timings.record(contender.name, step, wall, cpu)
