"""Load the row keys a SELECT needs before its rows are processed.

A result processor sees one value at a time, so without help each new row
key would cost one key-table query: 20,000 queries for 20,000 rows. Instead,
right after a SELECT that returns row-scoped columns of this manager has run
(``after_cursor_execute``), the rows are fetched from the DBAPI cursor, the
key ids are read from the value headers (bytes 1..8, no decryption), the keys
not yet cached are loaded with one ``IN`` query per 1,000 ids on the same
connection (so keys inserted earlier in the same transaction are found), and
the fetched rows are handed back to SQLAlchemy through its
``FullyBufferedCursorFetchStrategy``, the strategy it uses itself for results
that must be read before the conversation moves on.

Why not a ``column_expression`` that joins the key into the same SELECT
(as GeoAlchemy2 wraps geometry columns)? Extracting a big-endian key id from
a binary column is different SQL on each backend, SQLite has no such
function at all, and the join would repeat the wrapped key on every row.
The prefetch is one extra round trip per 1,000 distinct keys on every
backend, and costs nothing when the keys are cached.

Skipped (the per-value path then loads keys one by one, still correct):
server-side cursors (``yield_per``, ``stream_results``; keys are then loaded
on a separate connection, since a second query on the streaming one would
cut an unbuffered MySQL result short), DML with RETURNING, and textual SQL
whose columns SQLAlchemy cannot type.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import cursor as sa_cursor

from ..columns.encrypted import EncryptedType
from ..envelope import format as fmt
from ..keys import table as kt
from .keys import RowKeys

__all__ = ["install_prefetch", "row_positions"]


def row_positions(compiled: Any, manager: Any) -> tuple[list[int], str | None]:
    """Result-column positions holding row-scoped values of ``manager``."""
    positions, owner = [], None
    for i, entry in enumerate(getattr(compiled, "_result_columns", None) or ()):
        t = entry.type
        if isinstance(t, EncryptedType) and t.scope == kt.SCOPE_ROW and t.keys is manager:
            positions.append(i)
            owner = owner or t._table
    return positions, owner


def install_prefetch(rows: RowKeys, manager: Any) -> None:
    """Listen to the engine for SELECTs with row-scoped columns of ``manager``
    (the KeyManager their column types name)."""

    def after_cursor_execute(
        conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if executemany or context is None or context.compiled is None or cursor.description is None:
            return
        if context.isinsert or context.isupdate or context.isdelete:
            return
        positions, owner = row_positions(context.compiled, manager)
        if not positions or len(cursor.description) != len(context.compiled._result_columns):
            return
        if context._is_server_side:
            # Rows arrive while the caller iterates: no prefetch; key misses
            # go to another connection (keys.tracking knows it streams).
            return
        if context.cursor_fetch_strategy is not sa_cursor._DEFAULT_FETCH:
            return
        fetched = cursor.fetchall()
        context.cursor_fetch_strategy = sa_cursor.FullyBufferedCursorFetchStrategy(cursor, initial_buffer=fetched)
        key_id_of = fmt.key_id_of
        ids = {
            key_id_of(v)
            for row in fetched
            for v in (row[i] for i in positions)
            if v
        }
        wanted = rows.missing(ids)
        if wanted:
            rows.load(conn, wanted, table=owner or "", column=None)

    event.listen(rows.store.engine, "after_cursor_execute", after_cursor_execute)
