"""The markdown of the Core, async and streaming sections (see ``_report``)."""

from __future__ import annotations

from typing import Any

from ._markdown import ratio as _x
from ._markdown import seconds as _s
from ._markdown import table as _table
from ._rounds import Timings

__all__ = ["async_core", "core", "core_summary", "stream"]

BACKEND_NAMES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mysql": "MariaDB"}


def _cold_calls(info: dict[str, Any]) -> str:
    calls = info.get("cold_select_kms_calls")
    return "-" if not calls else "/".join(str(c) for c in sorted(set(calls)))


def core(name: str, backend: dict[str, Any], unavailable: dict[str, str]) -> list[str]:
    section = backend["core"]
    t = Timings.from_dict(section["timings"])
    header = ["variant", "insert s", "insert vs floor", "select s", "select vs floor", "cold select vs floor",
              f"IN ({section['lookup_values']:,}) lookup vs plaintext", "client CPU vs floor, insert / select",
              "KMS calls per cold select"]
    rows = []
    for variant, info in section["variants"].items():
        lookup = (_x(t.ratio(variant, "plaintext", "lookup")) if "lookup_unavailable" not in info
                  else f"n/a ({info['lookup_unavailable']})")
        rows.append([variant, _s(t.median(variant, "insert")), _x(t.ratio(variant, "floor", "insert")),
                     _s(t.median(variant, "select")), _x(t.ratio(variant, "floor", "select")),
                     _x(t.ratio(variant, "floor", "select_cold")), lookup,
                     " / ".join(_x(t.ratio(variant, "floor", s, clock="cpu")) for s in ("insert", "select")),
                     _cold_calls(info)])
    rows += [[variant, f"n/a (not available: {reason})", *[""] * (len(header) - 2)]
             for variant, reason in unavailable.items()]
    title = f"### Core insert, select and lookup: {name} ({backend['server']}), {section['rows']:,} rows x 3 columns"
    note = ("`conn.execute(insert(t), rows)` (executemany) and `conn.execute(select(...)).all()`, every value "
            f"touched; medians over {t.rounds} rounds of within-round ratios. Row scope gets its keys from the Core "
            "hook inside the timed insert (made, bound, inserted); `row` lets the database make the primary keys "
            "(RETURNING), `row, ids given` passes them. The cold select follows an emptied key "
            "cache (a fresh process: every key unwrapped); the KMS column lists the distinct per-round counts.")
    return [title, "", note, "", *_table(header, rows), ""]


def core_summary(backends: dict[str, Any]) -> list[str]:
    """One table of Core ratios against the floor, every backend side by side."""
    ran = {n: Timings.from_dict(b["core"]["timings"]) for n, b in backends.items() if "core" in b}
    if not ran:
        return []
    variants = list(next(b["core"]["variants"] for b in backends.values() if "core" in b))
    header = ["variant"] + [f"{BACKEND_NAMES.get(n, n)} {step}" for n in ran
                            for step in ("insert", "select", "cold select")]
    rows = [[v] + [_x(t.ratio(v, "floor", step)) for t in ran.values() for step in ("insert", "select", "select_cold")]
            for v in variants]
    return ["### Core ratios against the floor, every backend", "", *_table(header, rows), ""]


def async_core(backends: dict[str, Any]) -> list[str]:
    rows = []
    for name, backend in backends.items():
        section = backend.get("async")
        if section is None:
            continue
        if "unavailable" in section:
            rows.append([name, f"n/a ({section['unavailable']})", "", "", "", ""])
            continue
        t = Timings.from_dict(section["timings"])
        for variant in section["variants"]:
            rows.append([name, variant, _s(t.median(variant, "insert")), _x(t.ratio(variant, "floor", "insert")),
                         _s(t.median(variant, "select")), _x(t.ratio(variant, "floor", "select"))])
    if not rows:
        return []
    header = ["backend", "variant", "insert s", "insert vs async floor", "select s", "select vs async floor"]
    return ["### Core through the async engine (aiosqlite, asyncpg)", "", *_table(header, rows), ""]


def stream(backends: dict[str, Any]) -> list[str]:
    rows = []
    for name, backend in backends.items():
        section = backend.get("stream")
        if section is None:
            continue
        for scope, info in section["scopes"].items():
            if "unavailable" in info:
                rows.append([name, scope, f"n/a ({info['unavailable']})", *[""] * 6])
                continue
            rows.append([name, scope, f"{info['rows_read']:,}", _s(info["seconds"]), f"{info['us_per_row']:.1f}",
                         _x(info["per_row_growth"]), f"{info['peak_rss_growth_mib']:.1f}", str(info["kms_calls"]),
                         str(info.get("row_key_queries", "-"))])
        if "row_vs_table" in section:
            rows.append([name, "row / table", "", _x(section["row_vs_table"]), "", "", "", "", ""])
    if not rows:
        return []
    header = ["backend", "scope", "rows", "seconds", "us per row", "per row, whole / first tenth",
              "peak RSS growth MiB", "KMS calls", "row-key queries"]
    note = ("Each table is read by a fresh process with `execution_options(yield_per=10_000)` (Core), cold key "
            "cache. \"whole / first tenth\" is the time per row over the whole stream divided by the time per "
            "row over its first tenth: 1.00x is flat. RSS is measured after imports and the first connection.")
    return ["### Streaming in a fresh process", "", note, "", *_table(header, rows), ""]
