"""Row keys for streamed results: loaded once per partition, never on the stream.

A server-side cursor (``yield_per``, ``stream_results``: PostgreSQL, MariaDB)
hands rows over as the caller iterates, so :mod:`.prefetch` cannot read the
whole result first. Without help, each row's key missed the cache and was
loaded on its own: one key-table query per row (200,000 queries for 200,000
rows), and every key stayed cached.

Instead the result's fetch strategy is SQLAlchemy's own
``BufferedRowCursorFetchStrategy`` (what a stream uses anyway) whose DBAPI
fetches pass each batch of rows (a partition: ``yield_per``'s size, or the
buffer's) through :class:`PartitionKeys` before SQLAlchemy processes them:
the key ids are read from the value headers, the missing keys are loaded in
one ``IN``/``ANY`` query per 1,000 ids **on another connection** of
the same engine (a second query on the streaming connection would cut an
unbuffered MySQL/MariaDB result short), and the rows' bindings are checked
as for a buffered result. SQLite has no server-side cursors but steps its
statement as rows are fetched: a ``yield_per`` / ``stream_results`` read
there gets the same pass, on its own connection, instead of being read
whole. Memory stays bounded by the partition: when a batch arrives, the
keys this stream loaded for the batch before are evicted (SQLAlchemy has
processed those rows by then), except those of rows it still holds
unprocessed; the last partition's keys are left to the cache's own bounds.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable

from sqlalchemy import Connection
from sqlalchemy.engine.cursor import BufferedRowCursorFetchStrategy

from ..envelope import format as fmt
from .keys import RowKeys

__all__ = ["PartitionKeys", "StreamingPrefetch", "key_ids"]

Check = Callable[[RowKeys, Connection, str, list[Any], list[int], Any], None]


def key_ids(fetched: Any, positions: Any) -> set[int]:
    """The key ids the row-scoped values of ``fetched`` rows name: their 8 id
    bytes collected first (a row's values share a key: one int conversion
    per key, not per value)."""
    cut = fmt.KEY_ID_SLICE
    try:
        heads = {v[cut] for row in fetched for i in positions if (v := row[i])}
    except TypeError:  # memoryview values (unhashable slices)
        key_id_of = fmt.key_id_of
        return {key_id_of(v) for row in fetched for i in positions if (v := row[i])}
    return {int.from_bytes(h, "big") for h in heads}


class PartitionKeys:
    """Loads and forgets the row keys of one streamed result, partition by partition.

    ``own``: the result is not on a server-side cursor (SQLite steps its
    statement as rows are fetched, and allows other statements meanwhile):
    keys are loaded on the result's own connection, which sees the keys of
    its own open transaction. Otherwise on another connection of the engine.
    """

    def __init__(
        self, rows: RowKeys, conn: Connection, owner: str, positions: list[int], pk: Any, check: Check, own: bool
    ) -> None:
        self.rows = rows
        self.conn = conn
        self.own = own
        self.owner = owner
        self.positions = positions
        self.pk = pk
        self.check = check
        self.loaded: set[int] = set()  # what this stream loaded for the partition before

    def ids(self, batch: Any) -> set[int]:
        """The key ids the row-scoped values of ``batch`` name."""
        return key_ids(batch, self.positions)

    def __call__(self, batch: Any, buffered: Any = ()) -> Any:
        """Prepare the keys of ``batch`` (rows just fetched; ``buffered``: rows
        fetched before, not yet processed); returns ``batch`` unchanged."""
        if not batch:
            return batch
        ids = self.ids(batch)
        # the previous partition's rows are processed: forget its keys first
        self.rows.cache.evict_many(self.loaded - ids - (self.ids(buffered) if buffered else set()))
        wanted = self.rows.missing(ids)
        with contextlib.ExitStack() as stack:
            other = self.conn if self.own else None
            if other is None and (wanted or self.pk is not None):
                other = stack.enter_context(self.conn.engine.connect())
                stack.enter_context(self.rows.tracker.use_connection(other))
            if wanted and other is not None:
                self.rows.load(other, wanted, table=self.owner, column=None)
            if self.pk is not None and self.owner and other is not None:
                self.check(self.rows, other, self.owner, list(batch), self.positions, self.pk)
        self.loaded = wanted
        return batch


class _Cursor:
    """The DBAPI cursor, with every fetched batch passed through the partition hook."""

    __slots__ = ("_cursor", "_hook", "_buffer")

    def __init__(self, cursor: Any, hook: PartitionKeys, buffer: Any) -> None:
        self._cursor = cursor
        self._hook = hook
        self._buffer = buffer

    def fetchmany(self, size: int) -> Any:
        return self._hook(self._cursor.fetchmany(size), self._buffer)

    def fetchall(self) -> Any:
        return self._hook(self._cursor.fetchall(), self._buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class StreamingPrefetch(BufferedRowCursorFetchStrategy):
    """SQLAlchemy's buffered-row strategy for streams, with keys prepared per batch."""

    __slots__ = ("_hook",)

    def __init__(self, cursor: Any, execution_options: Any, hook: PartitionKeys) -> None:
        self._hook = hook
        first = collections.deque(hook(cursor.fetchmany(1)))
        super().__init__(cursor, execution_options, initial_buffer=first)

    def _hooked(self, dbapi_cursor: Any) -> Any:
        return _Cursor(dbapi_cursor, self._hook, self._rowbuffer)

    def _buffer_rows(self, result: Any, dbapi_cursor: Any) -> None:
        super()._buffer_rows(result, self._hooked(dbapi_cursor))

    def fetchmany(self, result: Any, dbapi_cursor: Any, size: int | None = None) -> Any:
        return super().fetchmany(result, self._hooked(dbapi_cursor), size)

    def fetchall(self, result: Any, dbapi_cursor: Any) -> Any:
        return super().fetchall(result, self._hooked(dbapi_cursor))
