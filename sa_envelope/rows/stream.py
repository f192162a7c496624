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
one ``IN``/``ANY`` query per 1,000/10,000 ids **on another connection** of
the same engine (a second query on the streaming connection would cut an
unbuffered MySQL/MariaDB result short), and the rows' bindings are checked
as for a buffered result. Memory stays bounded by the partition: the keys
this stream loaded for the partition before the previous one are evicted
(two partitions are kept, since SQLAlchemy may still hold the previous
batch's last rows when it fetches the next, and processes the last batch
after the cursor is closed; what is left is the cache's to trim).
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable

from sqlalchemy import Connection
from sqlalchemy.engine.cursor import BufferedRowCursorFetchStrategy

from ..envelope import format as fmt
from .keys import RowKeys

__all__ = ["PartitionKeys", "StreamingPrefetch"]

Check = Callable[[RowKeys, Connection, str, list[Any], list[int], Any], None]


class PartitionKeys:
    """Loads and forgets the row keys of one streamed result, partition by partition."""

    def __init__(self, rows: RowKeys, conn: Connection, owner: str, positions: list[int], pk: Any, check: Check):
        self.rows = rows
        self.engine = conn.engine
        self.owner = owner
        self.positions = positions
        self.pk = pk
        self.check = check
        self.loaded: collections.deque[set[int]] = collections.deque(maxlen=2)

    def __call__(self, batch: Any) -> Any:
        """Prepare the keys of ``batch`` (rows just fetched); returns it unchanged."""
        if not batch:
            return batch
        key_id_of, positions = fmt.key_id_of, self.positions
        ids = {key_id_of(v) for row in batch for v in (row[i] for i in positions) if v}
        wanted = self.rows.missing(ids)
        with contextlib.ExitStack() as stack:
            other: Connection | None = None
            if wanted:
                other = stack.enter_context(self.engine.connect())
                stack.enter_context(self.rows.tracker.use_connection(other))
                self.rows.load(other, wanted, table=self.owner, column=None)
            if self.pk is not None and self.owner:
                if other is None:
                    other = stack.enter_context(self.engine.connect())
                    stack.enter_context(self.rows.tracker.use_connection(other))
                self.check(self.rows, other, self.owner, list(batch), positions, self.pk)
        if len(self.loaded) == self.loaded.maxlen:
            self.rows.cache.evict_many(self.loaded[0] - ids)
        self.loaded.append(wanted)
        return batch


class _Cursor:
    """The DBAPI cursor, with every fetched batch passed through the partition hook."""

    __slots__ = ("_cursor", "_hook")

    def __init__(self, cursor: Any, hook: PartitionKeys) -> None:
        self._cursor = cursor
        self._hook = hook

    def fetchmany(self, size: int) -> Any:
        return self._hook(self._cursor.fetchmany(size))

    def fetchall(self) -> Any:
        return self._hook(self._cursor.fetchall())

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
        return _Cursor(dbapi_cursor, self._hook)

    def _buffer_rows(self, result: Any, dbapi_cursor: Any) -> None:
        super()._buffer_rows(result, self._hooked(dbapi_cursor))

    def fetchmany(self, result: Any, dbapi_cursor: Any, size: int | None = None) -> Any:
        return super().fetchmany(result, self._hooked(dbapi_cursor), size)

    def fetchall(self, result: Any, dbapi_cursor: Any) -> Any:
        return super().fetchall(result, self._hooked(dbapi_cursor))
