"""The Core-path targets of issue 15, judged on every backend that ran.

Unlike the ORM targets (judged on PostgreSQL), these hold on SQLite,
PostgreSQL and MariaDB alike, so each line names its backend. Ratios are
medians of within-round ratios against "floor" (the fixed-key AES-GCM
``TypeDecorator``); a missing input is "n/a", never "met".
"""

from __future__ import annotations

from typing import Any, Callable

from ._rounds import Timings

__all__ = ["CORE_TARGETS", "evaluate_core"]

TABLE, ROW, DET, FLOOR = "sa-envelope table", "sa-envelope row", "sa-envelope deterministic", "floor"
Result = tuple[str, bool | None]
Check = Callable[[dict[str, Any]], Result]  # one backend's results -> (measured, ok)


def _vs_floor(section: str, name: str, step: str, limit: float) -> Check:
    def check(backend: dict[str, Any]) -> Result:
        raw = backend.get(section) or {}
        if "timings" not in raw:
            return f"n/a ({raw.get('unavailable', 'not run')})", None
        t = Timings.from_dict(raw["timings"])
        ratio = t.ratio(name, FLOOR, step)
        if ratio is None:
            return "n/a (not measured or not available)", None
        noise = t.ratio("floor (again)", FLOOR, step)
        cpu = t.ratio(name, FLOOR, step, clock="cpu")
        extra = "".join([f", client CPU {cpu:.3f}x" if cpu else "", f", floor again {noise:.3f}x" if noise else ""])
        return f"{ratio:.3f}x{extra}", ratio <= limit

    return check


def _cold_row(backend: dict[str, Any]) -> Result:
    measured, ok = _vs_floor("core", ROW, "select_cold", 1.5)(backend)
    calls = ((backend.get("core") or {}).get("variants", {}).get(ROW) or {}).get("cold_select_kms_calls")
    if ok is None or not calls:
        return measured, ok
    return f"{measured}; KMS calls per cold select {sorted(set(calls))}", ok and max(calls) == 1


def _stream(key: str, limit: float) -> Check:
    def check(backend: dict[str, Any]) -> Result:
        stream = backend.get("stream") or {}
        row = (stream.get("scopes") or {}).get("row") or {}
        if key == "row_vs_table":
            value = stream.get("row_vs_table")
            text = f"{value:.2f}x ({stream.get('rows', 0):,} rows)" if value else ""
        else:
            value = row.get("per_row_growth")
            span = f"{row.get('checkpoint_rows', 0):,} vs {row.get('rows_read', 0):,} rows"
            text = f"{value:.2f}x ({span})" if value else ""
        if not value:
            return f"n/a ({row.get('unavailable', 'not run')})", None
        return text, value <= limit

    return check


def _stream_memory(backend: dict[str, Any]) -> Result:
    scopes = (backend.get("stream") or {}).get("scopes") or {}
    row, table = scopes.get("row") or {}, scopes.get("table") or {}
    if "peak_rss_growth_mib" not in row or "peak_rss_growth_mib" not in table:
        return "n/a (not run)", None
    grown, partition = row["peak_rss_growth_mib"], max(table["peak_rss_growth_mib"], 1.0)
    text = f"{grown:.1f} MiB (table scope, same partitions: {table['peak_rss_growth_mib']:.1f} MiB)"
    return text, grown <= 2 * partition


CORE_TARGETS: list[tuple[str, Check]] = [
    ("Core: table scope <= 1.05x the floor on insert", _vs_floor("core", TABLE, "insert", 1.05)),
    ("Core: table scope <= 1.05x the floor on select", _vs_floor("core", TABLE, "select", 1.05)),
    ("Core: deterministic <= 1.15x the floor on insert", _vs_floor("core", DET, "insert", 1.15)),
    ("Core: deterministic <= 1.15x the floor on select", _vs_floor("core", DET, "select", 1.15)),
    ("Core: row scope <= 1.5x the floor on insert (row keys made in the timed step)",
     _vs_floor("core", ROW, "insert", 1.5)),
    ("Core: row scope <= 1.5x the floor on a cold select, 1 KMS call", _cold_row),
    ("async Core: table scope <= 1.1x the async floor on insert", _vs_floor("async", TABLE, "insert", 1.1)),
    ("async Core: table scope <= 1.1x the async floor on select", _vs_floor("async", TABLE, "select", 1.1)),
    ("stream: row scope within 1.5x of table scope", _stream("row_vs_table", 1.5)),
    ("stream: time per row flat (whole stream / first tenth <= 1.1x)", _stream("per_row_growth", 1.1)),
    ("stream: row-scope peak RSS growth <= 2x the table-scope stream's (one partition more)", _stream_memory),
]


def _per_value(results: dict[str, Any]) -> list[dict[str, str]]:
    if "micro" not in results:
        return []
    per = results["micro"].get("us_per_value") or {}
    lines = []
    for step, limit in (("encrypt", 1.2), ("decrypt", 1.1)):
        target = f"per value: table scope `{step}` <= {limit}x the floor"
        ours, floor = (per.get(TABLE) or {}).get(step), (per.get(FLOOR) or {}).get(step)
        if not ours or not floor:
            lines.append({"backend": "-", "target": target, "measured": "n/a (micro not run)", "status": "n/a"})
            continue
        ratio = ours / floor
        lines.append({"backend": "-", "target": target, "measured": f"{ours:.2f} us vs {floor:.2f} us: {ratio:.2f}x",
                      "status": "met" if ratio <= limit else "missed"})
    return lines


def evaluate_core(results: dict[str, Any]) -> list[dict[str, str]]:
    """Every Core target on every backend that ran a section it needs, then per value."""
    lines = []
    for name, backend in results.get("backends", {}).items():
        if "unavailable" in backend or not {"core", "async", "stream"} & set(backend):
            continue
        for target, check in CORE_TARGETS:
            measured, ok = check(backend)
            status = "n/a" if ok is None else ("met" if ok else "missed")
            lines.append({"backend": name, "target": target, "measured": measured, "status": status})
    return lines + _per_value(results)
