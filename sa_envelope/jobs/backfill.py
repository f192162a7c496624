"""The online backfill: fill a migrating column's new half while the application writes.

Between the expand and the contract of an online migration
(docs/migrations.md) the application writes both halves of the column in
every statement (:mod:`sa_envelope.columns.dualwrite`); this job fills the
new half (the *shadow* column) of the rows written before that: sealed from
the plaintext when encrypting, opened from the ciphertext when decrypting.

Each batch reads ``(pk, old, new)`` for a slice of a claimed primary-key
range (:mod:`.claims`), computes the new half of the rows that need it, and
writes them with one executemany compare-and-set::

    UPDATE t SET new = :value WHERE pk = :pk AND old <=> :old_read AND new <=> :new_read

so an application write that lands in between (it changes ``old``, or
``new``, or deletes the row) always wins: the row is left to the
application. The comparison is exact: byte for byte on MariaDB (whose
collations fold case), and on the text of a PostgreSQL ``JSON`` value,
which has no equality operator, and of any JSON half (the batch reads
``CAST(old AS TEXT)`` for it: a dict bound back would be serialised anew).
A row-scoped column's values are sealed under each row's key: the key bound
to the row, or one made and bound in the batch's transaction
(:func:`sa_envelope.rows.orm.keys_for`), before the compare-and-set. Rows whose new half is set already are opened and compared, and
re-done if they disagree (an application instance that still wrote one half
during the roll-out of the dual-writing release). The cursor of the range
moves in the same transaction (:meth:`.claims.Claims.advance`), so a crash
at any point loses at most the batch in flight and a rerun resumes there; a
rerun after completion finds every range done and makes no write and no KMS
call. Keys are fetched through the store's cache (one unwrap per key per
process, whatever the rows or threads), and created, if new, in the
batch's transaction (``tracker.use_connection``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    cast,
    func,
    select,
    type_coerce,
    update,
)

from ..columns.encrypted import EncryptedType
from ..columns.rowvalue import RowValue
from ..errors import ConfigurationError, EnvelopeError
from ..faults import fault_point
from ..keys import table as kt
from ..keys.store import KeyStore
from ..rows.orm import keys_for
from ..rows.specs import TableSpec
from .claims import Claim, Claims, worker_name
from .progress import progress_bar
from .threads import run_workers
from .throttle import Throttle

__all__ = ["BackfillReport", "backfill", "disagreeing", "job_name", "plan_backfill"]

DIRECTIONS = ("encrypt", "decrypt")


@dataclass
class BackfillReport:
    """What one run did: rows it changed, ranges its workers finished."""

    table: str
    column: str
    direction: str
    written: int = 0
    conceded: int = 0  # rows an application write changed between the read and the write: left to it
    ranges: dict[str, list[int]] = field(default_factory=dict)  # worker -> lo of each range it finished

    def __str__(self) -> str:
        finished = sum(len(r) for r in self.ranges.values())
        return (
            f"{self.direction} {self.table}.{self.column}: {self.written} rows written, "
            f"{self.conceded} conceded to concurrent writes, "
            f"{finished} ranges finished by {len(self.ranges)} workers"
        )


def job_name(table: str, column: str, direction: str) -> str:
    return f"{direction}-column:{table}.{column}"


def _exact(column: Any, dialect: str) -> Any:
    """``column`` compared byte for byte: MariaDB's collations fold case and
    pad spaces, which would let a concurrent ``'a'`` -> ``'A'`` look unchanged."""
    if dialect in ("mysql", "mariadb") and isinstance(column.type, String):
        return cast(column, LargeBinary)
    return column


def _textual(column: Any, json: bool) -> bool:
    """A JSON half is compared on its text, as stored (PostgreSQL's ``json``
    has no ``=``; a bound dict is serialised anew, with other spacing than
    the stored text): ``json`` keeps the text as written, ``jsonb`` prints it
    canonically, MariaDB and SQLite store text. ``json``: the column's
    values are JSON (its type, or the EncryptedType's inner type)."""
    return json and not isinstance(column.type, LargeBinary)


def _unchanged(column: Any, name: str, dialect: str, textual: bool) -> Any:
    """``column`` still holds what the batch read (bound as ``name``)."""
    if textual:
        column, param = cast(column, Text), bindparam(name, type_=Text())
    else:
        param = bindparam(name, type_=column.type)
    return _exact(column, dialect).is_not_distinct_from(_exact(param, dialect))


def _plain(value: Any) -> Any:
    """A value as read, ready to bind back (psycopg reads BYTEA as memoryview)."""
    return bytes(value) if isinstance(value, memoryview) else value


def _row_spec(enc: EncryptedType, table: Table, pk: Any) -> TableSpec | None:
    """What the row keys need of the table, for a row-scoped column."""
    if enc.scope != kt.SCOPE_ROW:
        return None
    return TableSpec(enc.keys, table, enc._table or table.name, (), (), (pk.key,), (pk,), (0,))


class _Backfill:
    """One job: its table, halves, statements and the transformation."""

    def __init__(self, store: KeyStore, enc: EncryptedType, table: Table, column: str, shadow: str, encrypt: bool):
        self.store, self.enc, self.encrypt = store, enc, encrypt
        self.conceded, self._count_lock = 0, threading.Lock()  # summed across the job's threads
        pk = list(table.primary_key.columns)
        if len(pk) != 1 or pk[0].type.python_type is not int:
            raise ConfigurationError(
                f"table {table.name} needs a single integer primary key for an online backfill", table=table.name
            )
        self.pk, self.old, self.new = pk[0], table.c[column], table.c[shadow]
        self.spec = _row_spec(enc, table, self.pk)
        dialect = store.engine.dialect.name
        json = isinstance(enc.inner, JSON) or isinstance((self.old if encrypt else self.new).type, JSON)
        # the plaintext half read and written as JSON even where it is reflected as text (MariaDB)
        plain_type = enc.inner if isinstance(enc.inner, JSON) else None
        halves = [type_coerce(c, plain_type) if plain_type is not None and _textual(c, json) else c
                  for c in (self.old, self.new)]  # fmt: skip
        self.texts = [c for c in (self.old, self.new) if _textual(c, json)]  # read with the row, compared as text
        self.pick = select(self.pk, *halves, *(cast(c, Text) for c in self.texts)).order_by(self.pk)
        self.cas = (
            update(table)
            .where(
                self.pk == bindparam("_pk"),
                _unchanged(self.old, "_old", dialect, self.old in self.texts),
                _unchanged(self.new, "_new", dialect, self.new in self.texts),
            )
            .values(
                {
                    self.new.name: bindparam(
                        "_value", type_=plain_type if not encrypt and plain_type is not None else self.new.type
                    )
                }
            )
        )

    def target(self, old: Any, new: Any) -> tuple[bool, Any]:
        """(whether the row needs a write, the value its new half must hold:
        the plaintext to seal when encrypting)."""
        if old is None:
            return new is not None, None
        if self.encrypt:
            if new is not None:
                try:
                    if self.enc.decrypt(bytes(new)) == old:
                        return False, None
                except EnvelopeError:  # a damaged shadow: the plaintext is the truth
                    pass
            return True, old
        value = self.enc.decrypt(bytes(old))
        return new is None or new != value, value

    def read(self, row: Any) -> dict[str, Any]:
        """The compare-and-set's parameters for what ``row`` held."""
        held = {"_pk": row[0], "_old": _plain(row[1]), "_new": _plain(row[2])}
        for i, column in enumerate(self.texts, start=3):
            held["_old" if column is self.old else "_new"] = row[i]
        return held

    def seal(self, conn: Connection, params: list[dict[str, Any]]) -> None:
        """Encrypting: seal each ``_value`` (row scope: under its row's key,
        made and bound on ``conn`` where the row has none yet)."""
        if not self.encrypt:
            return
        keys: list[Any] = [None] * len(params)
        if self.spec is not None:
            todo = [i for i, p in enumerate(params) if p["_value"] is not None]
            for i, key in zip(todo, keys_for(conn, self.spec, [(params[i]["_pk"],) for i in todo], True)[0]):
                keys[i] = key
        for p, key in zip(params, keys):
            if p["_value"] is not None:
                p["_value"] = self.enc.encrypt(p["_value"] if key is None else RowValue(p["_value"], key))

    def batch(self, conn: Connection, claims: Claims, claim: Claim, size: int, pacer: Throttle | None) -> int:
        with self.store.tracker.use_connection(conn):
            rows = conn.execute(self.pick.where(self.pk >= claim.cursor, self.pk < claim.hi).limit(size)).all()
            params = []
            for row in rows:
                needed, value = self.target(row[1], row[2])
                if needed:
                    params.append({**self.read(row), "_value": value})
            cursor = rows[-1][0] + 1 if len(rows) == size else claim.hi
            if pacer is not None:  # between the read and the compare-and-set: no lock is held yet
                pacer.wait(len(rows))
            self.seal(conn, params)  # row keys: made in this transaction, rolled back with it
            claims.advance(conn, claim, cursor, len(params))  # first: holds the range until commit
            fault_point("backfill.batch.before_update")
            written = 0
            if params:
                result = conn.execute(self.cas, params)
                written = result.rowcount if conn.dialect.supports_sane_multi_rowcount else len(params)
            fault_point("backfill.batch.after_update")
        with self._count_lock:
            self.conceded += len(params) - max(written, 0)
        return max(written, 0)


def disagreeing(
    store: KeyStore,
    enc: EncryptedType,
    table_name: str,
    column: str,
    shadow: str,
    *,
    direction: str,
    batch_size: int = 1000,
) -> int:
    """Rows whose shadow does not hold their value yet (empty, or another
    value): read in primary-key order, batch by batch, each shadow opened.
    What a careful contract checks (``verify=True``) before it drops a half."""
    engine = store.engine
    job = _Backfill(
        store, enc, Table(table_name, MetaData(), autoload_with=engine), column, shadow, direction == "encrypt"
    )
    count, cursor = 0, None
    with engine.connect() as conn:
        while True:
            pick = job.pick if cursor is None else job.pick.where(job.pk > cursor)
            rows = conn.execute(pick.limit(batch_size)).all()
            if not rows:
                return count
            count += sum(1 for row in rows if job.target(row[1], row[2])[0])
            cursor = rows[-1][0]


def _claims(
    job: _Backfill, table_name: str, column: str, direction: str, *, lease: float, restart: bool, span: int
) -> Claims:
    """The job's claims, planned (once: a rerun or a concurrent worker finds them)."""
    engine = job.store.engine
    claims = Claims(engine, job_name(table_name, column, direction), lease=lease)
    claims.create()
    if restart:
        claims.reset()
    with engine.connect() as conn:
        planned = claims.planned(conn)
        lo, hi = (None, None) if planned else conn.execute(select(func.min(job.pk), func.max(job.pk))).one()
    if not planned:
        claims.plan(int(lo or 0), int(hi if hi is not None else -1) + 1, span)
    return claims


def plan_backfill(
    store: KeyStore,
    enc: EncryptedType,
    table_name: str,
    column: str,
    shadow: str,
    *,
    direction: str = "encrypt",
    batch_size: int = 500,
    lease: float = 60.0,
    chunk: int | None = None,
    restart: bool = False,
) -> int:
    """Plan the job's ranges (what several worker processes' parent does once,
    before they start, so none of them restarts another's work); returns the
    primary-key span left, the progress bar's total."""
    job = _Backfill(store, enc, Table(table_name, MetaData(), autoload_with=store.engine), column, shadow,
                    direction == "encrypt")  # fmt: skip
    claims = _claims(job, table_name, column, direction, lease=lease, restart=restart, span=chunk or batch_size * 20)
    return claims.span_left()


def backfill(
    store: KeyStore,
    enc: EncryptedType,
    table_name: str,
    column: str,
    shadow: str,
    *,
    direction: str = "encrypt",
    batch_size: int = 500,
    workers: int = 1,
    rate: float | None = None,
    lease: float = 60.0,
    chunk: int | None = None,
    restart: bool = False,
    progress: bool | None = None,
    bar: Any = None,
) -> BackfillReport:
    """Fill ``shadow`` from ``column`` of ``table_name`` (see the module).

    ``enc`` is the column's EncryptedType bound to the final ``table.column``.
    ``workers`` threads share the job through the claims table with any
    other process running it; ``rate`` caps this process's rows per second;
    ``chunk`` is the primary-key span of one claimed range (default 20
    batches); ``restart`` forgets earlier progress and checks every row
    again; ``bar``: a progress bar to update instead of drawing one.
    """
    if direction not in DIRECTIONS:
        raise ConfigurationError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    table = Table(table_name, MetaData(), autoload_with=store.engine)
    job = _Backfill(store, enc, table, column, shadow, direction == "encrypt")
    claims = _claims(job, table_name, column, direction, lease=lease, restart=restart, span=chunk or batch_size * 20)
    report = BackfillReport(table_name, column, direction)
    pacer = Throttle(rate) if rate else None
    lock = threading.Lock()
    # the bar counts primary-key span left in the job's ranges: rows where keys are dense, and an honest ETA
    total = claims.span_left() if bar is None else None
    with progress_bar(total, f"{direction}-column {table_name}.{column}", progress if bar is None else False) as own:
        shown = own if bar is None else bar

        def work(_: int) -> None:
            owner = worker_name()

            def one(conn: Connection, claim: Claim) -> int:
                start = claim.cursor
                n = job.batch(conn, claims, claim, batch_size, pacer)
                shown.update(claim.cursor - start)
                return n

            written, ranges = claims.run(owner, one)
            with lock:
                report.written += written
                report.ranges[owner] = ranges

        run_workers(max(1, workers), work)
    report.conceded = job.conceded
    return report
