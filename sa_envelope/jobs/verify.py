"""Verification: open every encrypted value of a database and check every key it names.

It needs no application models: columns are found by the shape of their
values (:mod:`.scan`), not by asking the key table, so a column whose keys
were deleted is still checked, and each of its values counts as a failure.
Each failure is sorted by what fixes it (:data:`.scan.KINDS`): a key missing
from the key table, a key this provider cannot unwrap (the wrong provider is
configured: every value under it fails, which is not corruption), a key row
that does not authenticate, or one value that does not authenticate (named
by its row's primary key). Values whose row key was shredded are counted as
erased, not failed. The key table itself is checked too (:mod:`.keycheck`).
Values written with a pinned ``context=`` that differs from their current
table and column show as failures: pass ``contexts`` to map them. Nothing
the report holds is plaintext or key material.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sqlalchemy import Connection, Table, func, select

from ..envelope import format as fmt
from ..keys.store import KeyStore
from . import scan
from .keycheck import Anomaly, key_anomalies
from .progress import progress_bar

__all__ = ["ColumnResult", "VerifyReport", "verify_database"]

SHOWN_VALUES = 20  # failing values named one by one per column; the rest are counted


@dataclass
class ColumnResult:
    """Counts for one (table, column, key id); ``kind`` and ``reason`` of its failures."""

    ok: int = 0
    failed: int = 0
    erased: int = 0
    kind: str = ""
    reason: str = ""


@dataclass
class VerifyReport:
    """Values checked by (table, column, key id), failing values by primary
    key as ``(table, column, key, row)``, and key-table anomalies."""

    results: dict[tuple[str, str, str], ColumnResult] = field(default_factory=lambda: defaultdict(ColumnResult))
    bad_values: list[tuple[str, str, str, str]] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.results.values())

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.results.values())

    @property
    def erased(self) -> int:
        return sum(r.erased for r in self.results.values())

    @property
    def complete(self) -> bool:
        """Every value opened (or was erased on purpose) and the key table is sound."""
        return not self.failed and not self.anomalies

    def columns(self) -> dict[tuple[str, str], dict[str, int]]:
        """Per table.column: ok, erased, failed, and failed values per kind."""
        out: dict[tuple[str, str], dict[str, int]] = {}
        for (table, column, _), r in sorted(self.results.items()):
            counts = out.setdefault((table, column), {"ok": 0, "erased": 0, "failed": 0})
            counts["ok"] += r.ok
            counts["erased"] += r.erased
            counts["failed"] += r.failed
            if r.failed:
                counts[r.kind] = counts.get(r.kind, 0) + r.failed
        return out

    def lines(self) -> list[str]:
        out = []
        for (table, column, key), r in sorted(self.results.items()):
            line = f"{table}.{column} key {key}: {r.ok} ok, {r.failed} failed"
            out.append(line + (f", {r.erased} erased" if r.erased else ""))
            if r.failed and r.kind != scan.BAD_VALUE:
                out.append("  " + _key_line(table, column, key, r))
        for table, column, key, row in self.bad_values:
            out.append(f"  value {row} of {table}.{column} does not authenticate (key {key})")
        for (table, column), counts in self.columns().items():
            kinds = ", ".join(f"{counts[k]} {label}" for k, label in scan.KINDS.items() if counts.get(k))
            line = f"{table}.{column}: {counts['ok']} ok, {counts['erased']} erased, {counts['failed']} failed"
            out.append(line + (f" ({kinds})" if kinds else ""))
        out.extend(f"key table anomaly: key {key}: {reason}" for key, reason in self.anomalies)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The report for ``--json``: counts, failures and anomalies, by name."""
        return {
            "complete": self.complete,
            "values": self.ok + self.failed + self.erased,
            "ok": self.ok,
            "failed": self.failed,
            "erased": self.erased,
            "columns": [{"table": t, "column": c, **counts} for (t, c), counts in self.columns().items()],
            "keys": [
                {"table": t, "column": c, "key": k, "ok": r.ok, "failed": r.failed, "erased": r.erased}
                | ({"kind": r.kind, "reason": r.reason} if r.failed else {})
                for (t, c, k), r in sorted(self.results.items())
            ],
            "bad_values": [{"table": t, "column": c, "key": k, "row": row} for t, c, k, row in self.bad_values],
            "anomalies": [{"key": k, "reason": reason} for k, reason in self.anomalies],
        }


def _key_line(table: str, column: str, key: str, r: ColumnResult) -> str:
    if r.kind == scan.MISSING:
        why = "" if "no such key" in r.reason else f" ({r.reason})"  # a row key's parent, say
        return f"key {key} named by {r.failed} values of {table}.{column} is missing from the key table{why}"
    if r.kind == scan.UNWRAP:
        return (
            f"this provider cannot unwrap key {key} (configure the provider that wrapped it): "
            f"{r.failed} values of {table}.{column} ({r.reason})"
        )
    return f"key {key} named by {r.failed} values of {table}.{column} does not authenticate ({r.reason})"


def _verify_column(
    conn: Connection, opener: scan.Opener, table: Table, column: str, context: bytes, report: VerifyReport, bar: Any
) -> None:
    """Stream the column on ``conn``; key misses query the opener's connection
    (a streaming cursor, on MySQL, leaves its connection busy until fully read)."""
    pk = list(table.primary_key.columns)
    stmt = select(table.c[column], *pk).where(table.c[column].is_not(None))
    shown = 0
    for row in conn.execution_options(yield_per=1000).execute(stmt):
        opened = opener.open(row[0], table.name, column, context)
        result = report.results[(table.name, column, opened.key)]
        if opened.kind == scan.OK:
            result.ok += 1
        elif opened.kind == scan.ERASED:
            result.erased += 1
        else:
            result.failed += 1
            result.kind, result.reason = result.kind or opened.kind, result.reason or opened.reason
            if opened.kind == scan.BAD_VALUE and shown < SHOWN_VALUES:
                report.bad_values.append((table.name, column, opened.key, scan.pk_text(pk, row[1:])))
                shown += 1
        bar.update(1)


def verify_database(
    store: KeyStore,
    tables: Iterable[str] | None = None,
    contexts: Mapping[str, str] | None = None,
    *,
    progress: bool | None = None,
) -> VerifyReport:
    """Decrypt-check every encrypted value of ``tables`` (default: all tables)."""
    engine, report = store.engine, VerifyReport()
    names = scan.table_names(store, tables)
    contexts = contexts or {}
    with engine.connect() as conn, engine.connect() as lookups, store.tracker.use_connection(lookups):
        found = [(t, c) for t in (scan.reflect(conn, n) for n in names) for c in scan.encrypted_columns(conn, t)]
        total = sum(
            conn.execute(select(func.count()).select_from(t).where(t.c[c].is_not(None))).scalar_one() for t, c in found
        )
        opener = scan.Opener(store, lookups)
        with progress_bar(total, "verify values", progress) as bar:
            for table, column in found:
                bound = contexts.get(f"{table.name}.{column}", f"{table.name}.{column}")
                t, _, c = bound.rpartition(".")
                _verify_column(conn, opener, table, column, fmt.context_bytes(t, c), report, bar)
    report.anomalies = key_anomalies(store, tables)
    return report
