"""Re-encryption: move stored values off a data key that must go.

Rewrap changes what protects a data key; re-encryption changes the data key
itself, for when that key may be compromised. The values still under the
old key are found by their header alone (bytes 2 to 9 of every stored value
are its key id, see docs/format.md), in SQL, so the job reads only what it
must change. Each batch is one transaction; each row is written back only
if it still holds the bytes that were read (compare-and-set), so concurrent
application writes win. Re-running the job finds what is left: it is
resumable after a crash at any point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from sqlalchemy import Column, LargeBinary, and_, func, literal, select, tuple_, type_coerce, update

from . import _format as fmt
from . import _keytable as kt
from ._errors import ConfigurationError, EnvelopeError, KeyNotFoundError
from ._faults import fault_point
from ._progress import progress_bar

__all__ = ["ReencryptReport", "reencrypt_columns", "under_key"]


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
    needle = literal(key_id.to_bytes(fmt.KEY_ID_LEN, "big"), LargeBinary)
    return func.substr(raw, 2, fmt.KEY_ID_LEN) == needle


def _encrypted_type(column: Column[Any]) -> Any:
    from ._type import EncryptedType

    if not isinstance(column.type, EncryptedType) or column.table is None:
        raise ConfigurationError(f"{column} is not an EncryptedType column of a table")
    if not column.table.primary_key.columns:
        raise ConfigurationError(f"table {column.table.name} has no primary key to re-encrypt by")
    return column.type


def _prepare(keys: Any, key_id: int, owner: str) -> None:
    """Roll the key over first if it is still active, so new values avoid it."""
    from ._manager import KeyManager

    assert isinstance(keys, KeyManager)
    with keys.engine.connect() as conn:
        record = kt.get_record(conn, keys.table, key_id)
    if record is None:
        raise KeyNotFoundError(table=owner, key_id=fmt.format_key_id(key_id))
    if record.status == kt.ACTIVE:
        keys._rotate(record.owner_table, record.scope)


def _batch(keys: Any, column: Column[Any], key_id: int, size: int, after: Any, report: ReencryptReport) -> Any:
    """Re-encrypt one batch in one transaction; return the last primary key seen."""
    table, ctype = column.table, column.type
    pk = list(table.primary_key.columns)
    raw = type_coerce(column, LargeBinary)
    stmt = select(*pk, raw.label("raw")).where(under_key(column, key_id))
    if after is not None:
        stmt = stmt.where(tuple_(*pk) > tuple_(*after))
    with keys.engine.begin() as conn:
        rows = conn.execute(stmt.order_by(*pk).limit(size)).all()
        if not rows:
            return None
        for row in rows:
            old = bytes(row.raw)
            try:
                value = ctype.decrypt(old)
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
        fault_point("reencrypt.batch.before_commit")
    fault_point("reencrypt.batch.after_commit")
    return tuple(rows[-1][: len(pk)])


def reencrypt_columns(
    keys: Any,
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
        _prepare(keys, kid, columns[0].table.name)
    with keys.engine.connect() as conn:
        total = sum(_count(conn, c, kid) for c in columns)
    with progress_bar(total, "re-encrypt rows", progress) as bar:
        for column in columns:
            after = None
            while True:
                before = report.reencrypted + report.failed
                after = _batch(keys, column, kid, batch_size, after, report)
                bar.update(report.reencrypted + report.failed - before)
                if after is None:
                    break
    with keys.engine.connect() as conn:
        report.remaining = sum(_count(conn, c, kid) for c in columns)
    return report


def _count(conn: Any, column: Column[Any], key_id: int) -> int:
    stmt = select(func.count()).select_from(column.table).where(under_key(column, key_id))
    return int(conn.execute(stmt).scalar_one())
