"""Re-encryption: move stored values off a data key that must go.

Rewrap changes what protects a data key; re-encryption changes the data key
itself, for when that key may be compromised. The values still under the
old key are found by their header alone (the key id stands at a fixed
place in every stored value, see docs/format.md), in SQL, so the job reads
only what it must change. Each batch is one transaction (the runner's); each row is written back only
if it still holds the bytes that were read (compare-and-set), so concurrent
application writes win. Re-running the job finds what is left: it is
resumable after a crash at any point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from sqlalchemy import (
    Column,
    Connection,
    LargeBinary,
    MetaData,
    Table,
    and_,
    func,
    literal,
    select,
    tuple_,
    type_coerce,
    update,
)

from ..columns import binds
from ..columns.encrypted import EncryptedType
from ..envelope import format as fmt
from ..errors import ConfigurationError, EnvelopeError, KeyNotFoundError
from ..faults import fault_point
from ..keys import table as kt
from ..keys.store import KeyStore
from . import scan
from .runner import run_batches

__all__ = ["ReencryptReport", "reencrypt_columns", "reflected_columns", "under_key"]


@dataclass
class ReencryptReport:
    """Counts of one re-encryption run; ``remaining`` is what still names the old key."""

    key_id: str
    reencrypted: int = 0
    failed: int = 0
    remaining: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (table.column, reason)

    def __str__(self) -> str:
        return (
            f"re-encrypt off key {self.key_id}: {self.reencrypted} re-encrypted, "
            f"{self.failed} failed, {self.remaining} remaining"
        )


def under_key(column: Any, key_id: int) -> Any:
    """SQL: the stored value of ``column`` names ``key_id`` in its header."""
    raw = type_coerce(column, LargeBinary)
    needle = literal(fmt.key_id_bytes(key_id), LargeBinary)
    return func.substr(raw, *fmt.KEY_ID_SUBSTR) == needle


def _encrypted_type(column: Column[Any]) -> EncryptedType:
    if not isinstance(column.type, EncryptedType) or column.table is None:
        raise ConfigurationError(f"{column} is not an EncryptedType column of a table")
    if not column.table.primary_key.columns:
        raise ConfigurationError(f"table {column.table.name} has no primary key to re-encrypt by")
    return column.type


def _prepare(store: KeyStore, key_id: int, owner: str) -> None:
    """Roll the key over first if it is still active, so new values avoid it."""
    with store.engine.connect() as conn:
        record = kt.get_record(conn, store.table, key_id)
    if record is None:
        raise KeyNotFoundError(table=owner, key_id=fmt.format_key_id(key_id))
    if record.status == kt.ACTIVE:
        store.rotate(record.owner_table, record.scope)


class _ColumnBatches:
    """The batches of one column: keyset pagination by primary key, so each
    batch starts after the last row the previous one saw."""

    def __init__(self, column: Column[Any], key_id: int, size: int, report: ReencryptReport) -> None:
        self.column, self.key_id, self.size, self.report = column, key_id, size, report
        self.after: tuple[Any, ...] | None = None

    def __call__(self, conn: Connection) -> int:
        """Re-encrypt one batch on ``conn``; return how many rows it saw."""
        column, report = self.column, self.report
        table, ctype = column.table, _encrypted_type(column)
        pk = list(table.primary_key.columns)
        raw = type_coerce(column, LargeBinary)
        stmt = select(*pk, raw.label("raw")).where(under_key(column, self.key_id))
        if self.after is not None:
            stmt = stmt.where(tuple_(*pk) > tuple_(*self.after))
        rows = conn.execute(stmt.order_by(*pk).limit(self.size)).all()
        for row in rows:
            old = bytes(row.raw)
            try:
                value = ctype.decrypt(old, binds.require(ctype, conn.dialect))
            except EnvelopeError as exc:
                report.failed += 1
                report.failures.append((f"{table.name}.{column.name}", str(exc)))
                continue
            fault_point("reencrypt.row.before_update")
            conn.execute(
                update(table)
                .where(and_(*(c == row[i] for i, c in enumerate(pk))), raw == literal(old, LargeBinary))
                .values({column.name: value})
            )
            fault_point("reencrypt.row.after_update")
            report.reencrypted += 1
        if rows:
            self.after = tuple(rows[-1][: len(pk)])
        return len(rows)


def reencrypt_columns(
    store: KeyStore,
    columns: Sequence[Column[Any]],
    *,
    key_id: int | str,
    batch_size: int = 500,
    progress: bool | None = None,
) -> ReencryptReport:
    """Re-encrypt every value of ``columns`` stored under ``key_id`` (see module doc)."""
    kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
    for column in columns:
        _encrypted_type(column)
    report = ReencryptReport(key_id=fmt.format_key_id(kid))
    if columns:
        _prepare(store, kid, columns[0].table.name)
    with store.engine.connect() as conn:
        totals = [_count(conn, c, kid) for c in columns]
    for column, total in zip(columns, totals):  # one bar per column: the runner draws it
        run_batches(
            store.engine,
            "reencrypt",
            _ColumnBatches(column, kid, batch_size, report),
            total=total,
            desc=f"re-encrypt {column.table.name}.{column.name}",
            progress=progress,
        )
    with store.engine.connect() as conn:
        report.remaining = sum(_count(conn, c, kid) for c in columns)
    return report


def _count(conn: Any, column: Column[Any], key_id: int) -> int:
    stmt = select(func.count()).select_from(column.table).where(under_key(column, key_id))
    return int(conn.execute(stmt).scalar_one())


def reflected_columns(keys: Any, key_id: int | str, names: Iterable[str] | None = None) -> list[Column[Any]]:
    """The encrypted columns of the table that owns ``key_id``, found without models.

    For the CLI: the table is reflected and its encrypted columns found by
    their values (:mod:`.scan`). Each is declared ``EncryptedType(LargeBinary,
    keys)``, which re-seals the decrypted bytes exactly as they were (the
    inner type's serialisation is kept, whatever the type), deterministic
    when the key is. ``names`` restricts them.
    """
    store = keys.store
    kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
    with store.engine.connect() as conn:
        record = kt.get_record(conn, store.table, kid)
        if record is None:
            raise KeyNotFoundError(key_id=fmt.format_key_id(kid))
        if record.scope not in (kt.SCOPE_TABLE, kt.SCOPE_DETERMINISTIC):
            raise ConfigurationError(
                f"key {fmt.format_key_id(kid)} is a {record.scope} key of {record.owner_table}: only table "
                "and deterministic keys are re-encrypted (shred a row key instead)"
            )
        reflected = scan.reflect(conn, record.owner_table)
        found = scan.encrypted_columns(conn, reflected)
    chosen = list(names) if names else found
    strays = [n for n in chosen if n not in found]
    if strays:
        raise ConfigurationError(f"{record.owner_table} has no encrypted column {', '.join(strays)}")
    deterministic = record.scope == kt.SCOPE_DETERMINISTIC

    def declared(col: Column[Any]) -> Column[Any]:
        if col.name not in chosen:
            return Column(col.name, col.type, primary_key=col.primary_key)
        ctype = EncryptedType(LargeBinary(), keys, deterministic=deterministic)
        return Column(col.name, ctype, primary_key=col.primary_key)

    table = Table(record.owner_table, MetaData(), *(declared(c) for c in reflected.columns))
    return [table.c[n] for n in chosen]
