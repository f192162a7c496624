"""The performance targets of issue 6, judged from one run's results.

Targets are medians on PostgreSQL; when PostgreSQL was not part of the run,
the first backend that ran stands in and every line says which one it is.
A target whose inputs are missing (a variant not available yet, a section
not run) is "n/a" with the reason, never "met".
"""

from __future__ import annotations

from typing import Any, Callable

from ._rounds import Timings

__all__ = ["evaluate"]

TABLE, ROW, DET = "sa-envelope table", "sa-envelope row", "sa-envelope deterministic"
UTILS, SEF, FLOOR = "sqlalchemy-utils AesGcmEngine", "sqlalchemy-encrypted-field", "floor"
Check = Callable[[dict[str, Any]], tuple[str, bool | None]]  # backend results -> (measured, ok)


def _timings(backend: dict[str, Any]) -> Timings | None:
    orm = backend.get("orm")
    if not orm:
        return None
    return Timings.from_dict(orm["timings"])


def _ratio_check(name: str, base: str, step: str, limit: float, *, at_least: bool = False) -> Check:
    """``name / base`` on ``step`` within ``limit`` (or, inverted, base at least ``limit`` x slower)."""

    def check(backend: dict[str, Any]) -> tuple[str, bool | None]:
        timings = _timings(backend)
        ratio = timings.ratio(name, base, step) if timings else None
        if ratio is None:
            return "n/a (not measured or not available)", None
        cpu = timings.ratio(name, base, step, clock="cpu") if timings else None
        also = f" (client CPU {cpu:.3f}x)" if cpu else ""
        if at_least:  # ratio is the other's time over ours: our speed-up
            return f"{ratio:.2f}x faster{also}", ratio >= limit
        return f"{ratio:.3f}x{also}", ratio <= limit

    return check


def _faster(name: str, step: str) -> Check:
    return _ratio_check(name, TABLE, step, 1.0 + 1e-9, at_least=True)


def _lookup(backend: dict[str, Any]) -> tuple[str, bool | None]:
    ratio = (backend.get("lookup") or {}).get("ratio")
    if ratio is None:
        return "n/a", None
    cpu = backend["lookup"].get("cpu_ratio")
    also = f", client CPU {cpu:.3f}x" if cpu else ""
    return f"{ratio:.3f}x plaintext ({backend['lookup']['rows']:,} rows{also})", ratio <= 1.2


def _kms_calls(backend: dict[str, Any]) -> tuple[str, bool | None]:
    kms = backend.get("kms") or {}
    per_process = [
        sum(run["no_latency"][side].values())
        for run in kms.get("variants", {}).values() if "no_kms" not in run
        for side in ("insert_calls", "select_calls")
    ]
    if not per_process:
        return "n/a", None
    return f"max {max(per_process)} per process ({kms['rows']:,} rows)", max(per_process) <= 2


def _rewrap_flat(backend: dict[str, Any]) -> tuple[str, bool | None]:
    rewrap = (backend.get("jobs") or {}).get("rewrap") or {}
    sizes = rewrap.get("sizes")
    if not sizes:
        return f"n/a ({rewrap.get('unavailable', 'not run')})", None
    ordered = sorted(sizes.items(), key=lambda item: int(item[0]))
    first, last = ordered[0][1], ordered[-1][1]
    growth = last["seconds"] / first["seconds"]
    calls = {s.get("kms_calls") for _, s in ordered}
    text = f"{int(ordered[-1][0]):,} vs {int(ordered[0][0]):,} row keys: {growth:.2f}x time, KMS calls {sorted(calls)}"
    return text, growth <= 1.5 and len(calls) == 1


def _overhead(backend: dict[str, Any]) -> tuple[str, bool | None]:
    variants = (backend.get("orm") or {}).get("variants", {})
    ours = {name: info["stored_overhead"] for name, info in variants.items() if name.startswith("sa-envelope")}
    if not ours:
        return "n/a", None
    worst = max(max(v for k, v in o.items() if k != "mean") for o in ours.values())
    return f"max {worst:.0f} bytes per value", worst <= 40


TARGETS: list[tuple[str, Check]] = [
    ("table scope within 1.05x of the floor on insert", _ratio_check(TABLE, FLOOR, "insert", 1.05)),
    ("table scope within 1.05x of the floor on select", _ratio_check(TABLE, FLOOR, "select", 1.05)),
    ("at least 2x faster than sqlalchemy-utils on select", _ratio_check(UTILS, TABLE, "select", 2.0, at_least=True)),
    ("faster than sqlalchemy-encrypted-field on insert", _faster(SEF, "insert")),
    ("faster than sqlalchemy-encrypted-field on select", _faster(SEF, "select")),
    ("row scope within 1.5x of table scope on insert", _ratio_check(ROW, TABLE, "insert", 1.5)),
    ("row scope within 1.5x of table scope on select", _ratio_check(ROW, TABLE, "select", 1.5)),
    ("deterministic within 1.2x of table scope on insert", _ratio_check(DET, TABLE, "insert", 1.2)),
    ("deterministic within 1.2x of table scope on select", _ratio_check(DET, TABLE, "select", 1.2)),
    ("indexed equality lookup, deterministic within 1.2x of plaintext", _lookup),
    ("at most 2 KMS calls per 20,000 rows per process", _kms_calls),
    ("rewrap time flat in the number of row keys", _rewrap_flat),
    ("stored overhead at most 40 bytes per value", _overhead),
]


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """Judge every target on PostgreSQL (or the first backend that ran)."""
    backends = {n: b for n, b in results.get("backends", {}).items() if "unavailable" not in b}
    if not backends:
        return {"backend": None, "targets": [{"target": t, "measured": "n/a (no backend ran)", "status": "n/a"}
                                             for t, _ in TARGETS]}
    name = "postgresql" if "postgresql" in backends else next(iter(backends))
    lines = []
    for target, check in TARGETS:
        measured, ok = check(backends[name])
        status = "n/a" if ok is None else ("met" if ok else "missed")
        lines.append({"target": target, "measured": measured, "status": status})
    return {"backend": name, "targets": lines}
