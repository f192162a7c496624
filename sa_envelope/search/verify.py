"""Every search-index token checked against its row: ``verify_index``.

The tokens of a row must be exactly those of its current, decrypted value
under one live blind-index key (:mod:`.keyring`): the write key, or during a
rotation an older key the rebuild has not moved the row off yet (*moving*,
which lookups still find). Anything else is a problem, sorted by what it
does to lookups:

* **missing**: a row lacks some of its tokens and holds none it should not
  (a write past the hooks: raw SQL, a bulk load, a backup restored without
  the token table, an index added to a table that has rows): lookups miss it;
* **tampered**: a row holds tokens its value does not give (its value was
  changed past the hooks, or a token was forged or altered): extra
  candidates, which the re-check discards, and maybe missing ones;
* **stale**: tokens of rows that no longer exist (``orphan_tokens``; token
  table only: an array's tokens are in their row, :mod:`.arrays`).

With ``fix=True`` each row that is not under the write key gets its tokens
rebuilt (rows locked while they are, so a concurrent write is not undone)
and stale tokens are deleted, batch by batch: the same pass backfills a new
index, repairs a damaged one, and moves an index to a rotated key (the
rebuild job, :func:`rebuild`). Reports name the table, the column, the
index and key ids, and rows by primary key: never a value.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

from sqlalchemy import Integer, Table, and_, bindparam, delete, select, tuple_, update

from ..columns.searchable import indexes_of
from ..envelope import format as fmt
from ..keys import table as kt
from ..locking import read_committed, retry_deadlocks
from . import arrays, keyring, rowkeys
from . import tokens as tk
from .writes import row_key_of, token_entries

__all__ = ["IndexReport", "rebuild", "verify_index"]

_SHOWN = 20  # row keys kept per report, for the message


@dataclass
class IndexReport:
    """What one index's check found (``ok`` when nothing is missing, tampered or stale).

    ``key_id`` is the write key the tokens are checked against; ``moving``
    counts, per older live key id, the rows whose tokens are still under it
    (with ``fix=True``: the rows moved off it); ``stopped``: ``max_batches``
    cut the pass short."""

    table: str
    index: str
    column: str = ""
    key_id: str = "-"
    rows: int = 0
    missing: int = 0
    tampered: int = 0
    missing_tokens: int = 0
    extra_tokens: int = 0
    orphan_tokens: int = 0
    moving: dict[str, int] = field(default_factory=dict)
    fixed: bool = False
    stopped: bool = False
    examples: list[str] = field(default_factory=list)

    @property
    def rows_differing(self) -> int:
        """Rows whose tokens are those of no live key (missing or tampered)."""
        return self.missing + self.tampered

    @property
    def ok(self) -> bool:
        return not (self.rows_differing or self.orphan_tokens)

    def __str__(self) -> str:
        state = "ok" if self.ok else ("fixed" if self.fixed else "DIFFERS")
        moving = "".join(
            f"; {n} rows {'moved off' if self.fixed else 'still under'} key {k}" for k, n in sorted(self.moving.items())
        )
        tail = " (stopped early)" if self.stopped else ""
        return (
            f"{self.table}.{self.column} {self.index} (key {self.key_id}): {self.rows} rows, {state}; "
            f"{self.missing} missing, {self.tampered} tampered ({self.missing_tokens} tokens missing, "
            f"{self.extra_tokens} extra), {self.orphan_tokens} stale tokens of rows that do not exist{moving}{tail}"
        )


def verify_index(
    engine: Any, table: Table, *, fix: bool = False, batch_size: int = 500, max_batches: int | None = None
) -> list[IndexReport]:
    """Check (and with ``fix=True`` repair) every search index of ``table``
    in ``engine``'s database; ``max_batches`` stops each index's pass early."""
    return [_verify_one(engine, index, fix, batch_size, max_batches) for index in indexes_of(table)]


def rebuild(
    engine: Any,
    table: Table,
    *,
    batch_size: int = 500,
    max_batches: int | None = None,
    partition: tuple[int, int] | None = None,
) -> list[IndexReport]:
    """Move every search index of ``table`` to the blind-index write key
    (after a rotation): ``verify_index(fix=True)``. Rows already under it
    are left as they are, so a rerun resumes. ``partition=(i, n)``: this
    call is worker ``i`` of ``n`` processes (the CLI's ``--workers``) and
    rebuilds the rows whose integer primary key is ``i`` modulo ``n``;
    worker 0 also deletes stale tokens. An index of a table keyed otherwise
    is rebuilt whole by worker 0."""
    reports = []
    for index in indexes_of(table):
        pks = rowkeys.columns_of(index)
        share = partition if partition and len(pks) == 1 and isinstance(pks[0].type, Integer) else None
        if share is None and partition and partition[0] != 0:
            continue  # not shareable: worker 0's
        reports.append(_verify_one(engine, index, True, batch_size, max_batches, share))
    return reports


def _verify_one(
    engine: Any, index: Any, fix: bool, batch_size: int, max_batches: int | None, share: tuple[int, int] | None = None
) -> IndexReport:
    report = IndexReport(index.owner, index.name, column=index.column, fixed=fix)
    pks, source = rowkeys.columns_of(index), index.source_column()
    stored = [index.tokens_column] if index.storage == "array" else []
    query = select(*pks, source, *stored).order_by(*pks).limit(batch_size)
    if share is not None:
        query = query.where(pks[0] % share[1] == share[0])
    last: Any = None
    batches = 0
    while max_batches is None or batches < max_batches:
        done = retry_deadlocks(partial(_batch, engine, index, query, last, report, fix))
        if done is None:
            break
        report, last = done
        batches += 1
    else:
        report.stopped = True
        return report
    if not stored and (share is None or share[0] == 0):  # a row's array is in the row: none can outlive it
        retry_deadlocks(partial(_check_orphans, engine, index, pks, report, fix))
    return report


def _copy(report: IndexReport) -> IndexReport:
    """A batch counts into a copy: a deadlock retry starts it again from the counts before it."""
    return replace(report, moving=dict(report.moving), examples=list(report.examples))


def _batch(
    engine: Any, index: Any, query: Any, last: Any, report: IndexReport, fix: bool
) -> tuple[IndexReport, Any] | None:
    """One batch, one transaction (READ COMMITTED on MariaDB: :mod:`..locking`):
    the rows after ``last`` checked (and fixed); (a copy of ``report`` with
    them counted, the new ``last``), or None when no row is left."""
    report = _copy(report)
    pks = rowkeys.columns_of(index)
    k = len(pks)
    pk = pks[0] if k == 1 else tuple_(*pks)
    with read_committed(engine) as conn, conn.begin(), index.keys.use_connection(conn), keyring.using(conn):
        if fix and conn.dialect.name != "sqlite":
            query = query.with_for_update()  # a concurrent write waits: its tokens come after ours
        found = conn.execute(query if last is None else query.where(pk > last)).all()
        if not found:
            return None
        # (key, value[, stored]): a composite key as a tuple
        batch = [(r[0] if k == 1 else tuple(r[:k]), *r[k:]) for r in found]
        (_check_arrays if index.storage == "array" else _check_batch)(conn, index, batch, report, fix)
    return report, (batch[-1][0] if k == 1 else tuple_(*batch[-1][0]))


def _check_orphans(engine: Any, index: Any, pks: list[Any], report: IndexReport, fix: bool) -> None:
    tokens = index.tokens_table
    with read_committed(engine) as conn, conn.begin():
        alive = select(rowkeys.sql(pks))
        orphans = and_(tokens.c.owner == index.owner, tokens.c.name == index.name, tokens.c.row_key.not_in(alive))
        report.orphan_tokens = len(conn.execute(select(tokens.c.row_key).where(orphans)).all())
        if fix and report.orphan_tokens:
            conn.execute(delete(tokens).where(orphans))


def _live(index: Any) -> list[Any]:
    """The live keys, write key first (the first key is made if there is none:
    the tokens a row should have need one)."""
    keys = list(keyring.live_keys(index))
    return keys or [keyring.binding_of(index).live.write_key(index.owner, kt.SCOPE_BLIND_INDEX)]


def _sort_row(
    report: IndexReport, live: list[Any], moving: Counter[str], row_key: str, have: Any, expect: Callable[[Any], Any]
) -> bool:
    """Count one row whose stored tokens are ``have`` (``expect(key)``: what
    they are under one live key); True when it is not under the write key."""
    if have == expect(live[0]):
        return False
    older = next((e for e in live[1:] if have == expect(e)), None)
    if older is not None:
        moving[fmt.format_key_id(older.key_id)] += 1
    else:
        _count_problem(report, row_key, set(have or ()), set(expect(live[0]) or ()))
    return True


def _expected(index: Any, entry: Any, row_key: str, value: Any) -> set[int]:
    with keyring.under(entry):
        return {e[2] for e in token_entries(index, row_key, value)}


def _check_batch(conn: Any, index: Any, batch: list[Any], report: IndexReport, fix: bool) -> None:
    tokens = index.tokens_table
    keys = [row_key_of(row[0]) for row in batch]
    stored: dict[str, set[int]] = {k: set() for k in keys}
    found = conn.execute(
        select(tokens.c.row_key, tokens.c.token).where(
            tokens.c.owner == index.owner, tokens.c.name == index.name, tokens.c.row_key.in_(keys)
        )
    )
    for row_key, token in found:
        stored[row_key].add(token)
    live = _live(index)
    report.key_id = fmt.format_key_id(live[0].key_id)
    moving: Counter[str] = Counter(report.moving)
    to_fix: list[str] = []
    rebuilt: list[tk.Entry] = []
    for row_key, (_, value) in zip(keys, batch):
        report.rows += 1
        if _sort_row(report, live, moving, row_key, stored[row_key], lambda e: _expected(index, e, row_key, value)):
            to_fix.append(row_key)
            if fix:
                rebuilt.extend(token_entries(index, row_key, value))  # under the write key
    report.moving = dict(moving)
    if fix and to_fix:
        tk.delete_row_tokens(conn, tokens, index.owner, [index.name], to_fix)
        tk.insert_tokens(conn, tokens, index.owner, rebuilt)


def _array_of(index: Any, entry: Any, value: Any) -> list[int] | None:
    with keyring.under(entry):
        return arrays.tokens_value(index, value)


def _check_arrays(conn: Any, index: Any, batch: list[Any], report: IndexReport, fix: bool) -> None:
    """As :func:`_check_batch`, for tokens in the row's own array (:mod:`.arrays`)."""
    pks, column = rowkeys.columns_of(index), index.tokens_column
    live = _live(index)
    report.key_id = fmt.format_key_id(live[0].key_id)
    moving: Counter[str] = Counter(report.moving)
    to_fix: list[dict[str, Any]] = []
    for key, value, stored in batch:
        report.rows += 1
        have = sorted(stored) if stored is not None else None
        if _sort_row(report, live, moving, row_key_of(key), have, lambda e: _array_of(index, e, value)):
            keys = key if len(pks) > 1 else (key,)
            to_fix.append(
                {**{f"sae_pk{i}": k for i, k in enumerate(keys)}, "sae_tokens": _array_of(index, live[0], value)}
            )
    report.moving = dict(moving)
    if fix and to_fix:
        by_key = [c == bindparam(f"sae_pk{i}") for i, c in enumerate(pks)]
        conn.execute(update(index.table).where(*by_key).values({column: bindparam("sae_tokens")}), to_fix)


def _count_problem(report: IndexReport, row_key: str, have: set[int], expected: set[int]) -> None:
    if have < expected:
        report.missing += 1
    else:
        report.tampered += 1
    report.missing_tokens += len(expected - have)
    report.extra_tokens += len(have - expected)
    if len(report.examples) < _SHOWN:
        report.examples.append(row_key)
