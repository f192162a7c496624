"""The markdown report: one table per section, ratios first, then targets."""

from __future__ import annotations

from typing import Any

from ._markdown import ratio as _x
from ._markdown import seconds as _s
from ._markdown import table as _table
from ._report_core import async_core, core, core_summary, stream
from ._rounds import Timings

__all__ = ["render"]


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def _na(reason: str, width: int) -> list[str]:
    return [f"n/a ({reason})"] + [""] * (width - 1)


def _orm(name: str, backend: dict[str, Any], unavailable: dict[str, str]) -> list[str]:
    orm = backend["orm"]
    timings = Timings.from_dict(orm["timings"])
    header = ["variant", "insert s", "insert vs plain", "insert vs floor", "select s", "select vs plain",
              "select vs floor", "client CPU vs floor, insert / select", "stored +bytes/value",
              "KMS calls (all rounds)"]
    rows = []
    for variant, info in orm["variants"].items():
        cells = [variant]
        for step in ("insert", "select"):
            cells += [_s(timings.median(variant, step)), _x(timings.ratio(variant, "plaintext", step)),
                      _x(timings.ratio(variant, "floor", step))]
        cells.append(" / ".join(_x(timings.ratio(variant, "floor", step, clock="cpu")) for step in ("insert", "select")))
        stored = f"{info['stored_overhead']['mean']:.0f}"
        if info.get("keys_per_1k_rows", 0) >= 1:  # row scope: a key row per row, on top
            stored += f" (+{info['keys_per_1k_rows']:.0f} key rows per 1k rows)"
        cells.append(stored)
        cells.append(str(info.get("kms_calls_all_rounds", "-")))
        rows.append(cells)
    rows += [[variant, *_na(f"not available: {reason}", len(header) - 1)] for variant, reason in unavailable.items()]
    title = f"### ORM insert and select: {name} ({backend['server']}), {orm['rows']:,} rows x 3 columns"
    note = (f"Medians over {timings.rounds} rounds; each ratio is taken within a round, then the median. "
            "\"floor (again)\" vs \"floor\" shows the noise. Ratios are of wall time; the client CPU "
            "column (this process only, no database server) is for diagnosis on a busy machine.")
    return [title, "", note, "", *_table(header, rows), ""]


def _kms(backends: dict[str, Any]) -> list[str]:
    rows = []
    latency = None
    for name, backend in backends.items():
        kms = backend.get("kms") or {}
        latency = kms.get("latency_ms", latency)
        for variant, run in kms.get("variants", {}).items():
            if "no_kms" in run:
                rows.append([name, variant, f"{kms['rows']:,}", "0", "0", *_na(run["no_kms"], 4)])
                continue
            fast, slow = run["no_latency"], run["with_latency"]
            rows.append([name, variant, f"{kms['rows']:,}", str(sum(fast["insert_calls"].values())),
                         str(sum(fast["select_calls"].values())), f"{_s(fast['insert_s'])} / {_s(fast['select_s'])}",
                         f"{_ms(fast['insert_kms_s'])} / {_ms(fast['select_kms_s'])}",
                         f"{_s(slow['insert_s'])} / {_s(slow['select_s'])}",
                         f"{_ms(slow['insert_kms_s'])} / {_ms(slow['select_kms_s'])}"])
    if not rows:
        return []
    header = ["backend", "variant", "rows", "KMS calls, writer", "KMS calls, reader", "write / read s",
              "in KMS, ms", f"write / read s, +{latency:g} ms per call", f"in KMS, ms, +{latency:g} ms per call"]
    note = ("A writer process inserts the rows into a table with no key yet; a fresh reader process loads them. "
            "\"in KMS\" is the wall time spent inside KMS calls, the rest is per-row work.")
    return ["### KMS calls of a cold process (moto over HTTP)", "", note, "", *_table(header, rows), ""]


def _lookup(backends: dict[str, Any]) -> list[str]:
    rows = []
    for name, backend in backends.items():
        lookup = backend.get("lookup")
        if lookup is None:
            continue
        if "unavailable" in lookup:
            rows.append([name, *_na(lookup["unavailable"], 6)])
            continue
        t = Timings.from_dict(lookup["timings"])
        per = 1e3 / lookup["lookups"]
        rows.append([name, f"{lookup['rows']:,}", str(lookup["lookups"]),
                     f"{per * (t.median('plaintext', 'lookup') or 0):.3f}",
                     f"{per * (t.median('sa-envelope deterministic', 'lookup') or 0):.3f}", _x(lookup["ratio"]),
                     _x(lookup.get("cpu_ratio"))])
    if not rows:
        return []
    header = ["backend", "rows", "lookups", "plaintext ms/lookup", "deterministic ms/lookup", "ratio",
              "client CPU ratio"]
    return ["### Indexed equality lookup", "", *_table(header, rows), ""]


def _jobs(backends: dict[str, Any]) -> list[str]:
    rows = []
    for name, backend in backends.items():
        jobs = backend.get("jobs")
        if jobs is None:
            continue
        rewrap = jobs["rewrap"]
        if "unavailable" in rewrap:
            rows.append([name, "rewrap", *_na(rewrap["unavailable"], 2)])
        else:
            for size, info in rewrap["sizes"].items():
                rows.append([name, f"rewrap, {int(size):,} row keys under {rewrap['table_keys']} table keys",
                             f"{info['seconds']:.3f} s", f"{info.get('kms_calls', '-')} KMS calls"])
        for job in ("reencrypt", "reencrypt_2_workers", "encrypt_column"):
            if job not in jobs:
                continue
            info = jobs[job]
            if "unavailable" in info:
                rows.append([name, job, *_na(info["unavailable"], 2)])
            else:
                rows.append([name, f"{job}, {info['rows']:,} rows", f"{info['seconds']:.3f} s",
                             f"{info['rows_per_s']:,.0f} rows/s"])
    if not rows:
        return []
    return ["### Key jobs", "", *_table(["backend", "job", "time", "KMS calls / throughput"], rows), ""]


def _micro(micro: dict[str, Any] | None) -> list[str]:
    if not micro:
        return []
    per = micro["us_per_value"]
    base = {"encrypt": per["bare AESGCM"]["encrypt"], "decrypt": per["bare AESGCM"]["decrypt"]}
    floor = per.get("floor") or base
    rows = [[name, f"{v['encrypt']:.2f}", f"{v['decrypt']:.2f}", _x(v["encrypt"] / base["encrypt"]),
             _x(v["decrypt"] / base["decrypt"]), _x(v["encrypt"] / floor["encrypt"]),
             _x(v["decrypt"] / floor["decrypt"])] for name, v in per.items()]
    rows += [[name, *_na(reason, 6)] for name, reason in micro["unavailable"].items()]
    header = ["per value", "encrypt us", "decrypt us", "encrypt vs bare AESGCM", "decrypt vs bare AESGCM",
              "encrypt vs floor", "decrypt vs floor"]
    return [f"### Per-value cost ({micro['values']:,} email-sized values, warm key cache)", "",
            *_table(header, rows), ""]


def _targets(targets: dict[str, Any]) -> list[str]:
    where = targets["backend"] or "none"
    note = "" if where == "postgresql" else " (PostgreSQL was not measured: these are NOT the official targets)"
    rows = [[t["target"], t["measured"], t["status"]] for t in targets["targets"]]
    return [f"### Targets, judged on {where}{note}", "", *_table(["target", "measured", "status"], rows), ""]


def _core_targets(lines: list[dict[str, str]]) -> list[str]:
    if not lines:
        return []
    rows = [[t["backend"], t["target"], t["measured"], t["status"]] for t in lines]
    return ["### Core targets (issue 15), every backend", "",
            *_table(["backend", "target", "measured", "status"], rows), ""]


def render(results: dict[str, Any]) -> str:
    s = results["settings"]
    m = results["machine"]
    lines = [f"## sa-envelope benchmarks ({s['size']}: {s['rows']:,} rows, {s['rounds']} rounds)", "",
             f"{m['when']} on {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, "
             f"SQLAlchemy {m['versions'].get('sqlalchemy')}, load average at start {m['loadavg']}.", ""]
    unavailable = results.get("unavailable", {})
    ran: dict[str, Any] = {}
    for name, backend in results["backends"].items():
        if "unavailable" in backend:
            lines += [f"### {name}: n/a ({backend['unavailable']})", ""]
            continue
        ran[name] = backend
        if "orm" in backend:
            lines += _orm(name, backend, unavailable)
        if "core" in backend:
            lines += core(name, backend, unavailable)
    lines += core_summary(ran) + async_core(ran) + stream(ran)
    lines += _kms(ran) + _lookup(ran) + _jobs(ran) + _micro(results.get("micro"))
    lines += _targets(results["targets"]) + _core_targets(results.get("core_targets") or [])
    return "\n".join(lines)
