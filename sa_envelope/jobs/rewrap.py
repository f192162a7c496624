"""Re-wrapping data keys under another master key (CMK rotation).

Only keys wrapped by the provider itself (``parent_id IS NULL``: table keys,
deterministic keys) move; row keys sit under their table key and the row
data under its data key, so neither changes. That is why rotating the CMK
costs one KMS call per table key, whatever the row count.

The job is a loop of small transactions. Each claims a batch of stale key
rows (``SELECT ... FOR UPDATE SKIP LOCKED`` where the database has it, so
several workers share the work), re-wraps them (KMS ``ReEncrypt`` where the
target can do it, else unwrap with the source and wrap with the target) and
writes each back with a compare-and-set ``UPDATE ... WHERE wrapped_key =
<the bytes that were re-wrapped>``. A crash at any instant leaves every row
either old (readable by its old CMK, picked up by the next run) or new; a
row changed meanwhile by someone else is left alone. The plaintext key never
changes, so processes holding it in cache keep working.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Table, func, or_, select, update

from ..envelope import format as fmt
from ..errors import EnvelopeError
from ..faults import fault_point
from ..keys import choice
from ..keys import table as kt
from ..keys.store import KeyStore
from ..providers.base import CONTEXT_VERSION, KeyProvider
from ..locking import read_committed
from .runner import run_batches

__all__ = ["RewrapReport", "rewrap_keys", "target_key_id"]

SKIP_LOCKED_DIALECTS = ("postgresql", "mysql", "mariadb")


@dataclass
class RewrapReport:
    """What a rewrap run did.

    ``rewrapped``: keys this run moved to the target. ``current``: keys
    already wrapped by the target (or moved meanwhile by another worker).
    ``failed``: keys the providers refused, listed in ``failures`` as
    ``(key id, reason)``. ``locked``: stale keys left because another
    transaction held them (another worker, normally); run again to finish.
    ``untrusted``: keys wrapped by a CMK neither provider trusts, as
    ``(key id, wrapping key id)``: left as they are, never re-wrapped.
    """

    target: str
    rewrapped: int = 0
    current: int = 0
    failed: int = 0
    locked: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    untrusted: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every trusted provider-wrapped key is now wrapped by the target,
        and no foreign key was found."""
        return self.failed == 0 and self.locked == 0 and not self.untrusted

    def __str__(self) -> str:
        return (
            f"rewrap to {self.target}: {self.rewrapped} re-wrapped, {self.current} already current, "
            f"{self.failed} failed, {self.locked} locked elsewhere, {len(self.untrusted)} untrusted"
        )


def target_key_id(provider: KeyProvider) -> str:
    """The stable id new wraps will record (the CMK ARN for KMS, via DescribeKey)."""
    resolve = getattr(provider, "resolve", None)
    return str(resolve()) if callable(resolve) else provider.wrapping_key_id


def _count(conn: Connection, table: Table, *where: Any) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def _stale(table: Table, target_id: str) -> Any:
    """Rows not wrapped by the target, or wrapped with an older key context."""
    version = table.c.context_version
    return or_(table.c.wrapping_key_id != target_id, version.is_(None), version < CONTEXT_VERSION)


def _claim(conn: Connection, table: Table, target_id: str, size: int, skip: set[int]) -> list[kt.KeyRecord]:
    """Lock and return up to ``size`` stale keys that no other worker holds."""
    stmt = select(table).where(kt.provider_wrapped(table), _stale(table, target_id))
    if skip:
        stmt = stmt.where(table.c.id.not_in(skip))
    stmt = stmt.order_by(table.c.id).limit(size)
    if conn.dialect.name in SKIP_LOCKED_DIALECTS:
        stmt = stmt.with_for_update(skip_locked=True)
    return [kt.KeyRecord.from_row(r) for r in conn.execute(stmt)]


def _upgraded(record: kt.KeyRecord) -> kt.KeyRecord:
    """The row as the current key context binds it (created in whole seconds)."""
    created = record.created_at.replace(microsecond=0) if record.created_at is not None else kt.utcnow()
    return dataclasses.replace(record, created_at=created, context_version=CONTEXT_VERSION)


def _new_wrap(
    store: KeyStore, record: kt.KeyRecord, new: kt.KeyRecord, source: KeyProvider, target: KeyProvider
) -> tuple[bytes, str]:
    """The key's new wrapped bytes, bound to the current context: ReEncrypt
    if the target can, else unwrap with the source and wrap with the target."""
    assert record.wrapped_key is not None
    context, new_context = store.context_of(record), store.context_of(new)
    moved = target.rewrap(record.wrapped_key, context, record.wrapping_key_id, new_context)
    if moved is not None:
        return moved
    plaintext = source.unwrap(record.wrapped_key, context, record.wrapping_key_id)
    data_key = target.wrap(plaintext, new_context)
    return data_key.wrapped, data_key.wrapping_key_id


def _store(
    conn: Connection, table: Table, record: kt.KeyRecord, new: kt.KeyRecord, wrapped: bytes, wrapping_key_id: str
) -> bool:
    """Compare-and-set: write only if the row still holds the bytes we re-wrapped."""
    fault_point("rewrap.key.before_update")
    result = conn.execute(
        update(table)
        .where(
            table.c.id == record.id,
            table.c.wrapped_key == record.wrapped_key,
            table.c.wrapping_key_id == record.wrapping_key_id,
        )
        .values(
            wrapped_key=wrapped,
            wrapping_key_id=wrapping_key_id,
            updated_at=kt.utcnow(),
            created_at=new.created_at,
            context_version=new.context_version,
        )
    )
    fault_point("rewrap.key.after_update")
    return result.rowcount == 1


def _refused(record: kt.KeyRecord, source: KeyProvider, target: KeyProvider, report: RewrapReport) -> bool:
    """Report a row that must not move: foreign (untrusted by both providers)
    or dated in the future (its created time would be authenticated)."""
    shown = fmt.format_key_id(record.id)
    if not (source.trusts(record.wrapping_key_id) or target.trusts(record.wrapping_key_id)):
        report.untrusted.append((shown, record.wrapping_key_id))
        return True
    if choice.in_future(record, kt.utcnow()):
        report.failed += 1
        report.failures.append((shown, f"created_at {record.created_at} is in the future"))
        return True
    return False


def _rewrap_batch(
    conn: Connection,
    store: KeyStore,
    source: KeyProvider,
    target: KeyProvider,
    report: RewrapReport,
    size: int,
    skip: set[int],
) -> int:
    """Claim a batch, re-wrap it (in the runner's transaction). Returns its size."""
    records = _claim(conn, store.table, report.target, size, skip)
    for record in records:
        if _refused(record, source, target, report):
            skip.add(record.id)
            continue
        new = _upgraded(record)
        try:
            wrapped, wrapping_key_id = _new_wrap(store, record, new, source, target)
        except EnvelopeError as exc:  # refused by KMS: report, go on with the rest
            skip.add(record.id)
            report.failed += 1
            report.failures.append((fmt.format_key_id(record.id), str(exc)))
            continue
        if _store(conn, store.table, record, new, wrapped, wrapping_key_id):
            report.rewrapped += 1
        else:  # changed since we read it: another worker got there first
            report.current += 1
    return len(records)


def rewrap_keys(
    store: KeyStore, source: KeyProvider, target: KeyProvider, *, batch_size: int = 100, progress: bool | None = None
) -> RewrapReport:
    """Re-wrap every provider-wrapped key not yet wrapped by ``target``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    engine, table = store.engine, store.table
    report = RewrapReport(target=target_key_id(target))
    stale = _stale(table, report.target)
    with engine.connect() as conn:
        report.current = _count(conn, table, kt.provider_wrapped(table), ~stale)
        total = _count(conn, table, kt.provider_wrapped(table), stale)
    skip: set[int] = set()
    run_batches(
        engine,
        "rewrap",
        lambda conn: _rewrap_batch(conn, store, source, target, report, batch_size, skip),
        total=total,
        desc="rewrap keys",
        progress=progress,
        connect=read_committed,
    )
    with engine.connect() as conn:
        remaining = _count(conn, table, kt.provider_wrapped(table), stale)
    report.locked = max(0, remaining - report.failed - len(report.untrusted))
    return report
