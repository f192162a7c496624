"""Verification: try to decrypt every encrypted value of a database.

It needs no application models. Tables are reflected; a binary column is
taken as encrypted when its values carry a header naming a key of the key
table, and each such value is authenticated with the key it names and the
``table.column`` context it was bound to. Failures are counted by table,
column and key, and the scan goes on. The key table itself is checked too
(:mod:`.keycheck`): planted, relabelled or future-dated keys, several current
keys of one table, row keys without their parent, each named by key id. Values written with a pinned
``context=`` that differs from their current table and column show as
failures: pass ``contexts`` to map them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from sqlalchemy import LargeBinary, MetaData, Table, inspect, select
from sqlalchemy.types import _Binary

from ..envelope import format as fmt
from ..errors import EnvelopeError
from ..keys.store import KeyStore
from .keycheck import Anomaly, key_anomalies

__all__ = ["ColumnResult", "VerifyReport", "verify_database"]

SKIP_TABLES = ("alembic_version",)


@dataclass
class ColumnResult:
    """Counts for one (table, column, key id)."""

    ok: int = 0
    failed: int = 0
    reason: str = ""


@dataclass
class VerifyReport:
    """Values checked by (table, column, key id), and key-table anomalies
    as ``(key id, what is wrong)``."""

    results: dict[tuple[str, str, str], ColumnResult] = field(default_factory=lambda: defaultdict(ColumnResult))
    anomalies: list[Anomaly] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.results.values())

    @property
    def ok(self) -> int:
        return sum(r.ok for r in self.results.values())

    def lines(self) -> list[str]:
        out = []
        for (table, column, key), r in sorted(self.results.items()):
            line = f"{table}.{column} key {key}: {r.ok} ok, {r.failed} failed"
            out.append(line + (f" ({r.reason})" if r.failed else ""))
        out.extend(f"key table anomaly: key {key}: {reason}" for key, reason in self.anomalies)
        return out


def _open(store: KeyStore, value: bytes, table: str, column: str, context: bytes) -> tuple[str, str | None]:
    """Authenticate one value; return (key id, failure reason or None)."""
    try:
        version, key_id = fmt.read_header(value)
    except fmt.InvalidEnvelope as exc:
        return "-", str(exc)
    shown = fmt.format_key_id(key_id)
    try:
        key = store.decryption_key(key_id, table=table, column=column)
        if version != key.head[0]:
            return shown, "format version does not match the key's algorithm"
        fmt.open_value(key.cipher, version, value, context)
    except fmt.InvalidEnvelope as exc:
        return shown, str(exc)
    except EnvelopeError as exc:
        return shown, str(exc)
    return shown, None


def _looks_encrypted(conn: Any, store: KeyStore, table: Table, column: str) -> bool:
    """The column's first non-NULL value names a key of the key table."""
    first = conn.execute(select(table.c[column]).where(table.c[column].is_not(None)).limit(1)).scalar()
    if first is None:
        return False
    try:
        _, key_id = fmt.read_header(bytes(first))
    except fmt.InvalidEnvelope:
        return False
    return conn.execute(select(store.table.c.id).where(store.table.c.id == key_id)).first() is not None


def _verify_column(
    conn: Any, lookups: Any, store: KeyStore, table: Table, column: str, context: bytes, report: VerifyReport
) -> None:
    """Stream the column on ``conn``; key misses query ``lookups`` (a streaming
    cursor, on MySQL, leaves its connection busy until fully read)."""
    stmt = select(table.c[column]).where(table.c[column].is_not(None))
    values = conn.execution_options(yield_per=1000).execute(stmt).scalars()
    with store.tracker.use_connection(lookups):
        for value in values:
            key, reason = _open(store, bytes(value), table.name, column, context)
            result = report.results[(table.name, column, key)]
            if reason is None:
                result.ok += 1
            else:
                result.failed += 1
                result.reason = result.reason or reason


def verify_database(
    store: KeyStore, tables: Iterable[str] | None = None, contexts: Mapping[str, str] | None = None
) -> VerifyReport:
    """Decrypt-check every encrypted value of ``tables`` (default: all tables)."""
    engine, report = store.engine, VerifyReport()
    names = (
        list(tables)
        if tables
        else [t for t in inspect(engine).get_table_names() if t not in (store.table.name, *SKIP_TABLES)]
    )
    contexts = contexts or {}
    with engine.connect() as conn, engine.connect() as lookups:
        for name in names:
            table = Table(name, MetaData(), autoload_with=conn)
            for col in table.columns:
                if not isinstance(col.type, (_Binary, LargeBinary)) or not _looks_encrypted(
                    conn, store, table, col.name
                ):
                    continue
                bound = contexts.get(f"{name}.{col.name}", f"{name}.{col.name}")
                t, _, c = bound.rpartition(".")
                _verify_column(conn, lookups, store, table, col.name, fmt.context_bytes(t, c), report)
    report.anomalies = key_anomalies(store, tables)
    return report
