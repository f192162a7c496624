"""Which transaction made which key: the one tracker, for table and row keys.

The rule it serves: a key is trusted process-wide only once it has been
*read back* from the key table by a transaction that did not create it,
which proves it committed. Until then it is known only to the connection
that made it, and forgotten if that connection rolls back. So every key a
transaction inserts (table, deterministic, blind-index and row keys alike)
and every row key it shreds is recorded in that connection's
:class:`TxState`, in ``conn.info``; the transaction's fate decides the rest:

* commit: the record goes (the keys are stored; the next reader trusts them);
* rollback, or a pooled connection reset: the keys are evicted from the caches;
* rollback to a savepoint: the write-key choices are dropped and the row keys
  evicted (reloaded from the table if they survived); table keys stay cached
  but never become trusted early.

It also knows the *executing* connection (``before_execute``), so that a key
created while a value is bound is inserted in that statement's transaction,
and whether that connection is still *streaming* a result (a server-side
cursor: ``yield_per``, ``stream_results``). A key lookup must then go to
another connection: a second query on the streaming one would cut an
unbuffered MySQL/MariaDB result short, silently.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator

from sqlalchemy import Connection, Engine

from . import clock
from .cache import KeyCache
from .listeners import Listeners

__all__ = ["Tracker", "TxState"]


class TxState:
    """What one connection's open transaction knows that others must not.

    ``created``: table-level keys it inserted (not yet known to be stored).
    ``active``: (owner, scope) -> key id chosen for writing in it.
    ``rows``: row keys it inserted or shredded.
    """

    __slots__ = ("active", "created", "rows")

    def __init__(self) -> None:
        self.created: set[int] = set()
        self.active: dict[tuple[str, str], int] = {}
        self.rows: set[int] = set()


class Tracker:
    """Follows the executing connection and the fate of its transaction.

    ``on_execute`` is called with every statement before it runs, and
    ``on_compiled`` with its compiled form just before it is sent (the
    manager passes the query guards: the tracker knows no column types).
    ``listeners`` holds its binding's event listeners (its own, and those the
    binding's other pieces add), removed on unbind.
    """

    def __init__(
        self,
        engine: Engine,
        cache: KeyCache,
        on_execute: Callable[..., None] | None = None,
        on_compiled: Callable[[Any], None] | None = None,
    ) -> None:
        clock.install()  # the per-statement checks of the per-value path (keys.clock)
        self.cache = cache
        self.row_cache: KeyCache | None = None  # set by the row keys, once made
        self._on_execute_hook = on_execute
        self._on_compiled_hook = on_compiled
        self._conn: ContextVar[Connection | None] = ContextVar(f"sa_envelope_conn_{id(self)}", default=None)
        self._state_key = f"sa_envelope_state_{id(self)}"
        self._streaming_key = f"sa_envelope_streaming_{id(self)}"
        # the binding's listeners (keys.listeners): unbind removes them
        self.listeners = listen = Listeners(engine)
        listen.listen("before_execute", self._on_execute)
        listen.listen("after_cursor_execute", self._on_cursor_execute)
        if on_compiled is not None:
            listen.listen("before_cursor_execute", self._before_cursor_execute)
        listen.listen("commit", self._on_commit)
        listen.listen("rollback", self._on_rollback)
        listen.listen("rollback_savepoint", self._on_rollback_savepoint)
        listen.listen("reset", self._on_pool_reset)

    # -- the executing connection ------------------------------------------------------

    def current(self) -> Connection | None:
        """The connection of the statement being executed, if still usable
        for key queries (open, and not streaming a result)."""
        conn = self._conn.get()
        if conn is None or conn.closed or conn.invalidated or conn.info.get(self._streaming_key):
            return None
        return conn

    @contextlib.contextmanager
    def use_connection(self, conn: Connection) -> Iterator[Connection]:
        """Bind values through ``conn`` (for connections of another engine,
        such as Alembic's): new keys are then written in its transaction."""
        token = self._conn.set(conn)
        try:
            yield conn
        finally:
            self._conn.reset(token)

    def state(self, conn: Connection) -> TxState:
        """``conn``'s transaction record, made on first use."""
        state = conn.info.get(self._state_key)
        if state is None:
            state = conn.info[self._state_key] = TxState()
        return state

    # -- transaction fate ----------------------------------------------------------------

    def _on_execute(self, conn: Connection, clauseelement: Any, *args: Any) -> None:
        self._conn.set(conn)
        conn.info.pop(self._streaming_key, None)  # whatever streamed before is over now
        if self._on_execute_hook is not None:
            self._on_execute_hook(clauseelement, *args)

    def _before_cursor_execute(
        self, conn: Connection, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if context is not None and self._on_compiled_hook is not None:
            self._on_compiled_hook(context.compiled)

    def _on_cursor_execute(
        self, conn: Connection, cursor: Any, statement: Any, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if context is not None and context._is_server_side:
            conn.info[self._streaming_key] = True  # rows arrive while the caller iterates

    def _on_commit(self, conn: Connection) -> None:
        # The keys are stored now (or the commit fails and nothing is). Either
        # way, they are no longer private to this connection; the next reader
        # finds them in the key table and only then trusts them.
        conn.info.pop(self._state_key, None)

    def _on_rollback(self, conn: Connection) -> None:
        self._forget(conn.info.pop(self._state_key, None))

    def _on_rollback_savepoint(self, conn: Connection, name: Any, context: Any) -> None:
        # A key made before the savepoint may survive, one made after may not:
        # drop the choices, keep ``created`` so neither is ever trusted early.
        state = conn.info.get(self._state_key)
        if state is not None:
            state.active.clear()
            self._evict_rows(state.rows)

    def _on_pool_reset(self, dbapi_conn: Any, record: Any, reset_state: Any) -> None:
        self._forget(record.info.pop(self._state_key, None))

    def _forget(self, state: TxState | None) -> None:
        """Evict the keys whose rows were rolled back."""
        if state is not None:
            for key_id in state.created:
                self.cache.evict(key_id)
            self._evict_rows(state.rows)

    def _evict_rows(self, ids: set[int]) -> None:
        if self.row_cache is not None:
            for key_id in ids:
                self.row_cache.evict(key_id)
