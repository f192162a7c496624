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

The same pass checks that each row-scoped value's key is bound to the row
it was read from (:mod:`.binding`), wherever the row's primary key is in the
result, as it is in every ORM load: a value copied from another row of the
column raises :class:`~sa_envelope.DecryptionError`.

Server-side cursors (``yield_per``, ``stream_results``) get the same pass
per partition, on another connection (:mod:`.stream`). Skipped (the
per-value path then loads keys one by one, still correct, but the binding
is not checked): DML with RETURNING, and textual SQL whose columns
SQLAlchemy cannot type.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.engine import cursor as sa_cursor

from ..columns.encrypted import EncryptedType
from ..columns.merged import MergedRead
from sqlalchemy.sql.elements import ColumnElement

from ..envelope import format as fmt
from ..errors import DecryptionError
from ..keys import table as kt
from . import binding
from .keys import RowKeys
from .stream import PartitionKeys, StreamingPrefetch, key_ids

__all__ = ["check_binding", "install_prefetch", "pk_positions", "row_positions"]


def _stored_type(t: Any) -> Any:
    """The column type a result column's values are stored with: a migrating
    column read merged (columns.merged) holds its own envelopes, and JSON forms
    of its twin that name no key (their would-be ids are never found)."""
    return t.encrypted if isinstance(t, MergedRead) else t


def row_positions(compiled: Any, manager: Any) -> tuple[list[int], str | None]:
    """Result-column positions holding row-scoped values of ``manager``."""
    positions, owner = [], None
    for i, entry in enumerate(getattr(compiled, "_result_columns", None) or ()):
        t = _stored_type(entry.type)
        if isinstance(t, EncryptedType) and t.scope == kt.SCOPE_ROW and t.keys is manager:
            positions.append(i)
            owner = owner or t._table
    return positions, owner


def _by_source(compiled: Any, positions: list[int]) -> list[tuple[str | None, list[int]]]:
    """The positions grouped by the table (or alias) each column is read from,
    with the owner its values are bound to: each group is checked against
    its own table's primary key (joined eager loads read two tables)."""
    groups: dict[int, tuple[str | None, list[int]]] = {}
    for i in positions:
        entry = compiled._result_columns[i]
        source = next((getattr(o, "table", None) for o in entry.objects if isinstance(o, ColumnElement)), None)
        groups.setdefault(id(source), (_stored_type(entry.type)._table, []))[1].append(i)
    return list(groups.values())


def _table_of(entry: Any) -> Table | None:
    for obj in entry.objects:
        table = getattr(obj, "table", None)
        if isinstance(obj, ColumnElement) and isinstance(table, Table):
            return table
    return None


def _position(columns: Any, table: Table, name: str) -> int | None:
    for j, entry in enumerate(columns):
        for obj in entry.objects:
            if (
                isinstance(obj, ColumnElement)
                and getattr(obj, "table", None) is table
                and getattr(obj, "name", None) == name
            ):
                return j
    return None


def pk_positions(compiled: Any, positions: list[int], dialect: Any) -> tuple[list[int], list[Any]] | None:
    """Where the primary key of the row-scoped columns' table is in the result,
    with its result processors; ``None`` if it is not all there."""
    columns = compiled._result_columns
    table = _table_of(columns[positions[0]])
    if table is None or not table.primary_key.columns:
        return None
    found = []
    for column in table.primary_key.columns:
        j = _position(columns, table, column.name)
        if j is None:
            return None
        found.append(j)
    return found, [c.type._cached_result_processor(dialect, None) for c in table.primary_key.columns]


def check_binding(
    rows: RowKeys,
    conn: Connection,
    owner: str,
    fetched: list[Any],
    positions: list[int],
    pk: tuple[list[int], list[Any]],
) -> None:
    """Refuse a row whose row-scoped value's key is bound to another row (a
    value copied between rows): :class:`DecryptionError` for the whole result."""
    entries, key_id_of = rows.cache._entries, fmt.key_id_of
    pk_pos, procs = pk
    dkey = None
    for row in fetched:
        digest = None
        for i in positions:
            value = row[i]
            entry = entries.get(key_id_of(value)) if value else None
            if entry is None or entry.bound is None or entry.cipher is None:  # unbound, or shredded: None
                continue
            if digest is None:
                dkey = dkey or binding.digest_key(rows, conn, owner, create=False)
                if dkey is None:
                    raise DecryptionError("the table's row digest key is missing", table=owner)
                digest = binding.row_digest(dkey, [p(row[j]) if p else row[j] for j, p in zip(pk_pos, procs)])
            if entry.bound != digest:
                raise DecryptionError(
                    "the value's row key is bound to another row (a value copied between rows)",
                    table=owner,
                    key_id=fmt.format_key_id(entry.key_id),
                )


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
        if context.cursor_fetch_strategy is not sa_cursor._DEFAULT_FETCH:
            return
        if context._is_server_side or context.execution_options.get("stream_results"):
            # rows arrive while the caller iterates: keys per partition (rows.stream)
            pk = pk_positions(context.compiled, positions, conn.dialect)
            own = not context._is_server_side
            hook = PartitionKeys(rows, conn, owner or "", positions, pk, check_binding, own)
            context.cursor_fetch_strategy = StreamingPrefetch(cursor, context.execution_options, hook)
            return
        fetched = cursor.fetchall()
        context.cursor_fetch_strategy = sa_cursor.FullyBufferedCursorFetchStrategy(cursor, initial_buffer=fetched)
        ids = key_ids(fetched, positions)
        wanted = rows.missing(ids)
        if wanted:
            rows.load(conn, wanted, table=owner or "", column=None)
        for source, group in _by_source(context.compiled, positions):  # a join has several tables
            pk = pk_positions(context.compiled, group, conn.dialect)
            if pk is not None and source:
                check_binding(rows, conn, source, fetched, group, pk)

    rows.tracker.listeners.listen("after_cursor_execute", after_cursor_execute)  # removed on unbind
