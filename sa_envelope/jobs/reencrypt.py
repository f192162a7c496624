"""Re-encryption: move stored values off a data key that must go.

Rewrap changes what protects a data key; re-encryption changes the data key
itself: after a suspected compromise, or to rotate a deterministic or
blind-index key while queries keep matching (``keys.live``). Values still
under the old key are found by their header alone (the key id stands at a
fixed place in every stored value, see docs/format.md), in SQL, so the job
reads only what it must change. A blind index has no header: its digests
are recomputed from the source value under the current key, row by row;
so are the tokens of the table's search indexes (``search.verify.rebuild``).

Each batch is one transaction (the runner's) and one compare-and-set write
(:mod:`.batchwrite`): a row is written only if it still holds the bytes
that were read, so concurrent application writes win. ``workers`` threads
share a column through the database: value batches are claimed with
``FOR UPDATE SKIP LOCKED`` (a skipped row still names the old key, so the
next pass finds it); index batches, which cannot be found again without
recomputing every digest, take disjoint primary-key partitions
(``pk % workers``) and wait for locks. The same holds for workers that are
processes (the CLI's ``--workers``, :mod:`.processes`): each runs this job
for its ``partition``; one of them, or their parent, prepares the move
before they start and concludes it after they all end. Re-running the job finds what is
left: it is resumable after a crash at any point. When nothing is left of a
deterministic or blind-index key and every column (and search index) of
its table that uses it was moved, the key is marked ``retired`` and queries match one key again.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from sqlalchemy import Column, Integer, LargeBinary, func, select, type_coerce

from ..columns import binds
from ..columns.blindindex import BlindIndexType
from ..columns.encrypted import EncryptedType
from ..columns.guardrows import remove_settled
from ..columns.searchable import indexes_of
from ..envelope import format as fmt
from ..errors import ConfigurationError, EnvelopeError, KeyNotFoundError
from ..keys import table as kt
from ..keys.live import LiveKeys, retire_drained
from ..keys.store import KeyStore
from ..search.verify import rebuild as rebuild_indexes
from .moves import IndexBatches, Job, ReencryptReport, ValueBatches, under_key
from .progress import progress_bar
from ..locking import read_committed
from .runner import run_batches
from .threads import SharedBar, run_workers
from .throttle import Throttle

__all__ = [
    "ReencryptReport",
    "already_moved",
    "conclude",
    "count_left",
    "moved_columns",
    "prepare_move",
    "reencrypt_columns",
    "under_key",
]


def _scope_of(column: Column[Any]) -> str | None:
    """The key scope a column's stored bytes depend on."""
    ctype = column.type
    if isinstance(ctype, BlindIndexType):
        return kt.SCOPE_BLIND_INDEX
    if isinstance(ctype, EncryptedType):
        return kt.SCOPE_DETERMINISTIC if ctype.deterministic else ctype.scope
    return None


def _checked(column: Column[Any]) -> Column[Any]:
    if _scope_of(column) is None or column.table is None:
        raise ConfigurationError(f"{column} is not an EncryptedType or BlindIndexType column of a table")
    if not column.table.primary_key.columns:
        raise ConfigurationError(f"table {column.table.name} has no primary key to re-encrypt by")
    return column


def _prepare(store: KeyStore, live: LiveKeys, key_id: int, owner: str) -> kt.KeyRecord:
    """Rotate the key first if it is still active, so new values avoid it; for a
    deterministic or blind-index key, wait until no process writes under it
    and every transaction that did has ended (docs/rotation.md)."""
    with store.engine.connect() as conn:
        record = kt.get_record(conn, store.table, key_id)
    if record is None:
        raise KeyNotFoundError(table=owner, key_id=fmt.format_key_id(key_id))
    if record.status == kt.ACTIVE:
        store.rotate(record.owner_table, record.scope)
        live.invalidate(record.owner_table)
    if record.scope in kt.SINGLETON_SCOPES and record.status != kt.RETIRED:
        # after the switch everywhere, one more grace: writers that sealed under the old key
        # before they switched have committed (or rolled back) by then, so the move sees them
        settled = live.switched_at(record.owner_table, record.scope) + live.policy.grace
        time.sleep(max(0.0, settled - time.time()))
        live.invalidate(record.owner_table)
        if live.write_key(record.owner_table, record.scope).key_id == key_id:
            raise EnvelopeError("the key is still the write key", table=owner, key_id=fmt.format_key_id(key_id))
    return record


def count_left(conn: Any, column: Column[Any], key_id: int) -> int:
    """Values of ``column`` still under ``key_id`` (a blind index: every digest)."""
    if isinstance(column.type, BlindIndexType):  # no header: every digest is a candidate
        stmt = select(func.count()).select_from(column.table).where(column.is_not(None))
    else:
        stmt = select(func.count()).select_from(column.table).where(under_key(column, key_id))
    return int(conn.execute(stmt).scalar_one())


def _spans(job: Job, column: Column[Any]) -> list[tuple[int, int]] | None:
    """Value batches of several workers: each worker's first pass covers a
    slice of its own of the primary keys (``[lo, hi)``, the key range cut in
    ``workers`` parts). Without it every worker scans from the first row and
    they leapfrog: each page skips the rows the other holds locked, so each
    worker reads every row and the server did nearly twice the work of one
    worker. The slices only spread the start; the passes after them cover
    the whole table, skipping locked rows, as before."""
    if not job.partitioned or isinstance(column.type, BlindIndexType):
        return None  # index batches have their own partition (pk % workers)
    pk = column.table.primary_key.columns[0]
    with job.store.engine.connect() as conn:
        lo, hi = conn.execute(select(func.min(pk), func.max(pk))).one()
    if lo is None:
        return None
    width = -(-(int(hi) + 1 - int(lo)) // job.workers)
    return [(int(lo) + i * width, int(lo) + (i + 1) * width) for i in range(job.workers)]


def _move(job: Job, column: Column[Any], progress: bool | None, bar: Any) -> None:
    """Every worker over one column: value columns first over the worker's
    slice (:func:`_spans`), then over the whole table again while a pass
    moved something (rows skipped as locked, or written meanwhile by a process
    that had not yet switched keys)."""
    kind = IndexBatches if isinstance(column.type, BlindIndexType) else ValueBatches
    with job.store.engine.connect() as conn:
        total = count_left(conn, column, job.key_id)
    desc = f"re-encrypt {column.table.name}.{column.name}"
    spans = _spans(job, column) if total else None

    def work(worker: int) -> None:
        budget = job.max_batches
        span = spans[worker] if spans else None
        while True:
            batches = kind(job, column, worker, span)
            run_batches(job.store.engine, "reencrypt", batches, total=None, desc=desc, connect=read_committed,
                        bar=shared, throttle=job.throttle, max_batches=budget)  # fmt: skip
            if budget is not None:
                budget -= batches.batches
                if budget <= 0:
                    job.report.stopped = True
                    return
            if span is not None:  # the slice is done: now the whole table, whatever it wrote
                span = None
                continue
            if kind is IndexBatches or not batches.written:
                return

    if total and job.mine:
        _warm(job, column)
    with progress_bar(total, desc, progress if bar is None else False) as own:  # tqdm: rows done, rows/s, time left
        shared = SharedBar(own if bar is None else bar)
        if job.mine:
            run_workers(len(job.mine), lambda k: work(job.mine[k]))


def _warm(job: Job, column: Column[Any]) -> None:
    """Unwrap the keys of the move once, before the workers start: two
    workers missing the cache together would each call KMS."""
    owner, ctype, store = column.table.name, column.type, job.store
    if isinstance(ctype, BlindIndexType):
        job.live.keys(owner, kt.SCOPE_BLIND_INDEX)
        source = column.table.c[ctype.source]
        if isinstance(source.type, EncryptedType):  # the source's key, from one of its values
            with store.engine.connect() as conn:
                raw = conn.execute(
                    select(type_coerce(source, LargeBinary)).where(source.is_not(None)).limit(1)
                ).scalar()
                if raw is not None:
                    source.type.decrypt(bytes(raw), binds.require(source.type, conn.dialect))
    elif getattr(ctype, "deterministic", False):
        job.live.keys(owner, kt.SCOPE_DETERMINISTIC)
    else:
        store.decryption_key(job.key_id, table=owner, column=column.name)
        if isinstance(ctype, EncryptedType) and ctype.scope == kt.SCOPE_TABLE:
            store.encryption_key(owner, kt.SCOPE_TABLE)


def _covers(columns: Sequence[Column[Any]], record: kt.KeyRecord) -> bool:
    """Whether ``columns`` hold every declared column of the key's table that uses its scope."""
    tables = {c.table for c in columns if c.table.name == record.owner_table}
    users = {c for t in tables for c in t.columns if _scope_of(c) == record.scope}
    searched = record.scope == kt.SCOPE_BLIND_INDEX and any(_indexes(tables, record))
    return (bool(users) or searched) and users <= set(columns)


def _indexes(tables: Any, record: kt.KeyRecord) -> list[Any]:
    """The search indexes keyed by ``record`` (a blind-index key) among ``tables``'."""
    return [i for t in tables for i in indexes_of(t) if i.owner == record.owner_table]


def _reindex(
    store: KeyStore,
    record: kt.KeyRecord,
    columns: Sequence[Column[Any]],
    report: ReencryptReport,
    batch_size: int,
    max_batches: int | None,
    partition: tuple[int, int] | None,
) -> None:
    """Rebuild the search indexes of the key's table under the write key
    (rows already under it are skipped: a rerun resumes; one process of
    several: its ``partition`` of the rows); the key is retired only once
    they hold no token under it."""
    tables = {c.table for c in columns if _indexes([c.table], record)}
    for table in tables:
        reports = rebuild_indexes(store.engine, table, batch_size=batch_size, max_batches=max_batches,
                                  partition=partition)  # fmt: skip
        for index_report in reports:
            report.reindexed += sum(index_report.moving.values()) + index_report.rows_differing
            report.stopped = report.stopped or index_report.stopped


def reencrypt_columns(
    store: KeyStore,
    live: LiveKeys,
    columns: Sequence[Column[Any]],
    *,
    key_id: int | str,
    batch_size: int = 500,
    workers: int = 1,
    rate: float | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
    partition: tuple[int, int] | None = None,
    bar: Any = None,
) -> ReencryptReport:
    """Re-encrypt every value of ``columns`` stored under ``key_id`` (see module doc).

    ``workers`` threads share the work in this process. ``partition=(i,
    n)``: this call is worker ``i`` of ``n`` processes running the same job
    (:mod:`.processes`; one thread here, partition ``i`` of the rows and of
    the search-index rebuild where the job partitions); the caller prepares the move first and concludes it after
    (:func:`prepare_move`, :func:`conclude`). ``bar``: a progress bar to
    update instead of drawing one.
    """
    kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be at least 1")
    columns = [_checked(c) for c in columns]
    report = ReencryptReport(key_id=fmt.format_key_id(kid))
    if not columns:
        return report
    record = _prepare(store, live, kid, columns[0].table.name)
    blind = record.scope == kt.SCOPE_BLIND_INDEX
    if already_moved(record):
        report.retired = True  # moved and retired by an earlier run: nothing to read
        return report
    moved = moved_columns(columns, record)
    sqlite = store.engine.dialect.name == "sqlite"
    for column in moved:
        pk = list(column.table.primary_key.columns)
        count = 1 if sqlite else (partition[1] if partition else workers)  # SQLite: one writer, more would wait
        partitioned = count > 1 and len(pk) == 1 and isinstance(pk[0].type, Integer)
        if blind and count > 1 and not partitioned:
            count = 1  # partitions need a single integer primary key
        mine = list(range(count)) if partition is None else [i for i in [partition[0]] if i < count]
        job = Job(store, live, kid, batch_size, count, partitioned, Throttle(rate) if rate else None, max_batches,
                   report, mine)  # fmt: skip
        _move(job, column, progress, bar)
    if blind:
        _reindex(store, record, columns, report, batch_size, max_batches, partition)
    return conclude(store, live, columns, record, report) if partition is None else report


def prepare_move(store: KeyStore, live: LiveKeys, columns: Sequence[Column[Any]], key_id: int | str) -> kt.KeyRecord:
    """What a job run by several processes does once, before they start:
    rotate the key if it is still the write key, wait for the switch."""
    kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
    return _prepare(store, live, kid, _checked(columns[0]).table.name)


def already_moved(record: kt.KeyRecord) -> bool:
    """A blind-index key retired by an earlier run: nothing is left to read
    (its digests have no header to find stale ones by)."""
    return record.scope == kt.SCOPE_BLIND_INDEX and record.status == kt.RETIRED


def moved_columns(columns: Sequence[Column[Any]], record: kt.KeyRecord) -> list[Column[Any]]:
    """The columns whose stored bytes move off the key: the blind indexes for
    a blind-index key (its other columns name the source), else the values."""
    blind = record.scope == kt.SCOPE_BLIND_INDEX
    return [c for c in columns if isinstance(c.type, BlindIndexType) == blind]


def conclude(
    store: KeyStore, live: LiveKeys, columns: Sequence[Column[Any]], record: kt.KeyRecord, report: ReencryptReport
) -> ReencryptReport:
    """Count what is left under the key and retire it if nothing is (after
    every worker ended: one of several processes cannot tell on its own)."""
    blind = record.scope == kt.SCOPE_BLIND_INDEX
    if already_moved(record):
        report.retired = True
        return report
    moved = moved_columns(columns, record)
    with store.engine.connect() as conn:
        report.remaining = report.failed if blind else sum(count_left(conn, c, record.id) for c in moved)
    _retire(store, live, record, columns, report)
    return report


def _retire(
    store: KeyStore, live: LiveKeys, record: kt.KeyRecord, columns: Sequence[Column[Any]], report: ReencryptReport
) -> None:
    """Retire a drained deterministic / blind-index key: queries stop matching it."""
    if record.scope not in kt.SINGLETON_SCOPES or report.stopped or report.remaining or report.failed:
        return
    if not _covers(columns, record):
        return
    with store.engine.begin() as conn:
        report.retired = retire_drained(conn, store.table, record.id)
        if report.retired and record.scope == kt.SCOPE_DETERMINISTIC:
            _drop_guards(conn, store.table, record.owner_table)
    live.invalidate(record.owner_table)


def _drop_guards(conn: Any, keys: Any, owner: str) -> None:
    """With one live deterministic key left, ``owner``'s uniqueness guards
    lock nothing any more (columns/guardrows): remove them in bulk."""
    remove_settled(conn, keys, owner)
