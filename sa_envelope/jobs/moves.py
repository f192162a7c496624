"""The batches that move one column's values off a key: what the
re-encryption job (:mod:`.reencrypt`) reads, recomputes and writes back per
batch, and the report it adds to. Kept apart from the job's orchestration
(preparing the move, workers, retiring the key) so each stays short."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from sqlalchemy import Column, Connection, LargeBinary, func, literal, select, tuple_, type_coerce

from ..columns import binds
from ..columns.blindindex import BlindIndexType
from ..columns.encrypted import EncryptedType
from ..envelope import format as fmt
from ..errors import EnvelopeError
from ..faults import fault_point
from ..keys.live import LiveKeys
from ..keys.store import KeyStore
from .batchwrite import write_cas
from .throttle import Throttle

__all__ = ["SKIP_LOCKED_DIALECTS", "IndexBatches", "Job", "ReencryptReport", "ValueBatches", "under_key"]

SKIP_LOCKED_DIALECTS = ("postgresql", "mysql", "mariadb")

# A page is "the next N rows in key order whose header names the key". PostgreSQL has no
# statistics on that expression (it guesses 0.5 % of the rows match), so it plans a scan
# of every row after the cursor (bitmap or sequential) and a sort of all of them: 66 ms a
# batch at the start of a 100,000-row table against 0.5 ms for the key-order index scan that
# stops at N rows, each batch costing what is left of the table. The batch's own transaction
# disables both (one statement: one round trip).
PG_PAGE_PLAN = "SELECT set_config('enable_sort', 'off', true), set_config('enable_bitmapscan', 'off', true)"


@dataclass
class ReencryptReport:
    """Counts of one re-encryption run; ``remaining`` is what still names the
    old key; ``stopped``: ``max_batches`` cut the run short; ``retired``: the
    (deterministic or blind-index) key is no longer matched by queries."""

    key_id: str
    reencrypted: int = 0
    failed: int = 0
    remaining: int = 0
    stopped: bool = False
    retired: bool = False
    reindexed: int = 0  # rows whose search-index tokens were rebuilt (a blind-index key)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (table.column, reason)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, written: int, failures: Sequence[tuple[str, str]] = ()) -> None:
        """Count one batch's work (workers report concurrently)."""
        with self._lock:
            self.reencrypted += written
            self.failed += len(failures)
            self.failures.extend(failures)

    def __str__(self) -> str:
        tail = f", {self.reindexed} rows re-indexed" if self.reindexed else ""
        tail += ", key retired" if self.retired else (", stopped early" if self.stopped else "")
        return (
            f"re-encrypt off key {self.key_id}: {self.reencrypted} re-encrypted, "
            f"{self.failed} failed, {self.remaining} remaining{tail}"
        )


def under_key(column: Any, key_id: int) -> Any:
    """SQL: the stored value of ``column`` names ``key_id`` in its header."""
    raw = type_coerce(column, LargeBinary)
    needle = literal(fmt.key_id_bytes(key_id), LargeBinary)
    return func.substr(raw, *fmt.KEY_ID_SUBSTR) == needle


class _Batches:
    """One worker's batches of one column: keyset pagination by primary key
    (each batch starts after the last row the previous one saw), in this
    worker's partition, locked as the column kind needs."""

    def __init__(self, job: Job, column: Column[Any], worker: int, span: tuple[int, int] | None = None) -> None:
        self.job, self.column, self.worker, self.span = job, column, worker, span
        self.pk = list(column.table.primary_key.columns)
        self.after: tuple[Any, ...] | None = None
        self.batches = self.written = 0

    def page(self, stmt: Any, conn: Connection, *, skip_locked: bool) -> list[Any]:
        pk, job = self.pk, self.job
        if self.after is not None:
            stmt = stmt.where(tuple_(*pk) > tuple_(*self.after))
        if job.partitioned and not skip_locked:  # value batches share the rows by skipping locked ones
            stmt = stmt.where(pk[0] % job.workers == self.worker)
        if self.span is not None:  # this worker's slice of the keys (a first pass, see reencrypt._move)
            stmt = stmt.where(pk[0] >= self.span[0], pk[0] < self.span[1])
        stmt = stmt.order_by(*pk).limit(job.batch_size)
        if conn.dialect.name in SKIP_LOCKED_DIALECTS:
            stmt = stmt.with_for_update(skip_locked=skip_locked)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(PG_PAGE_PLAN)
        rows = list(conn.execute(stmt).all())
        if rows:
            self.after = tuple(rows[-1][: len(pk)])
            self.batches += 1
        return rows

    def write(self, conn: Connection, pending: list[Any], failures: list[tuple[Any, str, str]]) -> None:
        """Write the batch; report the failures not reported by an earlier pass."""
        fault_point("reencrypt.row.before_update")  # once per batch: one statement writes it
        written = write_cas(conn, self.column.table, self.pk, self.column.name, pending)
        fault_point("reencrypt.row.after_update")
        self.written += written
        seen = self.job.failed_rows
        new = [(where, reason) for key, where, reason in failures if (where, key) not in seen]
        seen.update((where, key) for key, where, _ in failures)
        self.job.report.add(written, new)


class ValueBatches(_Batches):
    """Values whose header names the old key: decrypted, sealed under the current key."""

    def __call__(self, conn: Connection) -> int:
        column, job = self.column, self.job
        ctype: EncryptedType = column.type  # type: ignore[assignment]
        raw = type_coerce(column, LargeBinary)
        stmt = select(*self.pk, raw.label("raw")).where(under_key(column, job.key_id))
        with job.store.tracker.use_connection(conn):
            rows = self.page(stmt, conn, skip_locked=True)
            pending, failures = [], []
            for row in rows:
                old = bytes(row.raw)
                try:
                    new = ctype.encrypt(ctype.decrypt(old, binds.require(ctype, conn.dialect)), job.store)
                except EnvelopeError as exc:
                    failures.append((tuple(row[: len(self.pk)]), f"{column.table.name}.{column.name}", str(exc)))
                    continue
                pending.append((tuple(row[: len(self.pk)]), old, new))
            if pending and fmt.read_header(pending[0][2])[1] == job.key_id:  # never "move" onto the same key
                raise EnvelopeError("the key is still the write key", table=column.table.name,
                                    column=column.name, key_id=job.report.key_id)  # fmt: skip
            self.write(conn, pending, failures)
        return len(rows)


class IndexBatches(_Batches):
    """Blind-index digests recomputed from the source value under the current key."""

    def __call__(self, conn: Connection) -> int:
        column, job = self.column, self.job
        itype: BlindIndexType = column.type  # type: ignore[assignment]
        source = column.table.c[itype.source]
        stype: Any = source.type
        encrypted = isinstance(stype, EncryptedType)
        value_col = type_coerce(source, LargeBinary) if encrypted else source
        stmt = select(*self.pk, value_col.label("src"), type_coerce(column, LargeBinary).label("idx"))
        with job.store.tracker.use_connection(conn):
            rows = self.page(stmt.where(column.is_not(None)), conn, skip_locked=False)
            pending, failures = [], []
            for row in rows:
                try:
                    value = (
                        stype.decrypt(bytes(row.src), binds.require(stype, conn.dialect))
                        if encrypted and row.src is not None
                        else row.src
                    )
                    new = itype.digest(value, job.store) if value is not None else None
                except EnvelopeError as exc:
                    failures.append((tuple(row[: len(self.pk)]), f"{column.table.name}.{column.name}", str(exc)))
                    continue
                if new is not None and new != bytes(row.idx):
                    pending.append((tuple(row[: len(self.pk)]), bytes(row.idx), new))
            self.write(conn, pending, failures)
        return len(rows)


@dataclass
class Job:
    store: KeyStore
    live: LiveKeys
    key_id: int
    batch_size: int
    workers: int
    partitioned: bool
    throttle: Throttle | None
    max_batches: int | None
    report: ReencryptReport
    mine: Sequence[int]  # the partitions this process works (all of them, or one per process)
    failed_rows: set[tuple[str, Any]] = field(default_factory=set)  # reported once, whatever the passes
