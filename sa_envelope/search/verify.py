"""Every search-index token checked against its row: ``verify_index``.

The tokens of a row must be exactly those of its current, decrypted value.
A missing token makes lookups miss the row (a write past the hooks: raw
SQL, a bulk load, a backup restored without the token table); an extra one
(a stale or forged token, or one of a deleted row) only adds candidates that
the re-check discards, but is reported too. With ``fix=True`` the rows that
differ get their tokens rebuilt and tokens of rows that no longer exist are
deleted, batch by batch: the same pass backfills an index added to a table
that already has rows, and rebuilds one after its key or settings change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, and_, bindparam, delete, select, tuple_, update

from ..columns.searchable import indexes_of
from . import arrays, rowkeys
from . import tokens as tk
from .writes import row_key_of, token_rows

__all__ = ["IndexReport", "verify_index"]

_SHOWN = 20  # row keys kept per report, for the message


@dataclass
class IndexReport:
    """What one index's check found (``ok`` when nothing differs)."""

    table: str
    index: str
    rows: int = 0
    rows_differing: int = 0
    missing_tokens: int = 0
    extra_tokens: int = 0
    orphan_tokens: int = 0
    fixed: bool = False
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.rows_differing or self.orphan_tokens)

    def __str__(self) -> str:
        state = "ok" if self.ok else ("fixed" if self.fixed else "DIFFERS")
        return (
            f"{self.table} {self.index}: {self.rows} rows, {state}; {self.rows_differing} rows differ "
            f"({self.missing_tokens} tokens missing, {self.extra_tokens} extra), "
            f"{self.orphan_tokens} tokens of rows that do not exist"
        )


def verify_index(engine: Any, table: Table, *, fix: bool = False, batch_size: int = 500) -> list[IndexReport]:
    """Check (and with ``fix=True`` repair) every search index of ``table``."""
    return [_verify_one(engine, index, fix, batch_size) for index in indexes_of(table)]


def _verify_one(engine: Any, index: Any, fix: bool, batch_size: int) -> IndexReport:
    report = IndexReport(index.owner, index.name, fixed=fix)
    pks, source, tokens = rowkeys.columns_of(index), index.source_column(), index.tokens_table
    stored = [index.tokens_column] if index.storage == "array" else []
    k = len(pks)
    pk = pks[0] if k == 1 else tuple_(*pks)
    last: Any = None
    while True:
        with engine.begin() as conn, index.keys.use_connection(conn):
            query = select(*pks, source, *stored).order_by(*pks).limit(batch_size)
            found = conn.execute(query if last is None else query.where(pk > last)).all()
            if not found:
                break
            # (key, value[, stored]): a composite key as a tuple
            batch = [(r[0] if k == 1 else tuple(r[:k]), *r[k:]) for r in found]
            last = batch[-1][0] if k == 1 else tuple_(*batch[-1][0])
            if stored:
                _check_arrays(conn, index, batch, report, fix)
            else:
                _check_batch(conn, index, tokens, batch, report, fix)
    if stored:
        return report  # a row's tokens are in the row: none can outlive it
    with engine.begin() as conn:
        alive = select(rowkeys.sql(pks))
        orphans = and_(tokens.c.owner == index.owner, tokens.c.name == index.name, tokens.c.row_key.not_in(alive))
        report.orphan_tokens = len(conn.execute(select(tokens.c.row_key).where(orphans)).all())
        if fix and report.orphan_tokens:
            conn.execute(delete(tokens).where(orphans))
    return report


def _check_batch(conn: Any, index: Any, tokens: Table, batch: list[Any], report: IndexReport, fix: bool) -> None:
    keys = [row_key_of(row[0]) for row in batch]
    stored: dict[str, set[int]] = {k: set() for k in keys}
    found = conn.execute(
        select(tokens.c.row_key, tokens.c.token).where(
            tokens.c.owner == index.owner, tokens.c.name == index.name, tokens.c.row_key.in_(keys)
        )
    )
    for row_key, token in found:
        stored[row_key].add(token)
    to_fix: list[str] = []
    rebuilt: list[dict[str, Any]] = []
    for row_key, (_, value) in zip(keys, batch):
        report.rows += 1
        expected = {r["token"] for r in token_rows(index, row_key, value)}
        if expected != stored[row_key]:
            report.rows_differing += 1
            report.missing_tokens += len(expected - stored[row_key])
            report.extra_tokens += len(stored[row_key] - expected)
            if len(report.examples) < _SHOWN:
                report.examples.append(row_key)
            to_fix.append(row_key)
            rebuilt.extend(token_rows(index, row_key, value))
    if fix and to_fix:
        tk.delete_row_tokens(conn, tokens, index.owner, [index.name], to_fix)
        tk.insert_tokens(conn, tokens, rebuilt)


def _check_arrays(conn: Any, index: Any, batch: list[Any], report: IndexReport, fix: bool) -> None:
    pks, column = rowkeys.columns_of(index), index.tokens_column
    to_fix: list[dict[str, Any]] = []
    for key, value, stored in batch:
        report.rows += 1
        expected = arrays.tokens_value(index, value)
        if expected != (sorted(stored) if stored is not None else None):
            have, want = set(stored or ()), set(expected or ())
            report.rows_differing += 1
            report.missing_tokens += len(want - have)
            report.extra_tokens += len(have - want)
            if len(report.examples) < _SHOWN:
                report.examples.append(row_key_of(key))
            keys = key if len(pks) > 1 else (key,)
            to_fix.append({**{f"sae_pk{i}": k for i, k in enumerate(keys)}, "sae_tokens": expected})
    if fix and to_fix:
        by_key = [c == bindparam(f"sae_pk{i}") for i, c in enumerate(pks)]
        fixing = update(index.table).where(*by_key).values({column: bindparam("sae_tokens")})
        conn.execute(fixing, to_fix)
