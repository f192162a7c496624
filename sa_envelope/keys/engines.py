"""The engines a KeyManager is bound to, and which one a key lookup uses.

The rule this module keeps: **a value is sealed under a key stored in the
same database, in the same transaction, as its row**, whatever number of
engines an application has. So there is no "the engine" of a manager: each
bound engine gets a :class:`Binding` of its own (its tracker, its store and
so its own plaintext key cache), and a key is looked up or created only
through the binding of the engine the statement runs on. Two databases may
hold keys with the same id; their caches never meet, and a value copied from
one database into the other is opened with the other's key, and fails.

How a statement finds its binding: by its dialect. SQLAlchemy gives every
``Engine`` its own ``Dialect`` object (``execution_options()`` copies share
it, and the database) and builds a column type's bind and result processors
once per dialect, so the column types look the binding up once per dialect,
not per value (:mod:`sa_envelope.columns.encrypted`); code that holds a
connection (ORM hooks, jobs) asks :meth:`Engines.of`.

Code that runs while a statement executes but holds no connection (the
keys of an equality query or a search query, computed when it executes)
asks :meth:`Engines.current`: the engine of the connection executing in
this thread or task, kept by a process-wide ``before_execute`` listener
(never a guess among the connections other sessions hold open).

A statement on an engine that is not bound gets :class:`ConfigurationError`
naming that engine, never a key stored elsewhere: nothing falls back to
another engine. Its URL is known from a process-wide ``engine_connect``
listener (one dictionary write per new connection), since the processors
that meet the statement see only its dialect.

Management operations (``create_table``, ``warm``, ``rewrap``, ``rotate``...)
take an engine: :meth:`Engines.select` is the rule, one bound engine is the
default, several must be named.

:meth:`Engines.unbind` undoes a bind: the binding's event listeners
(:mod:`.listeners`) are removed, its plaintext table and row keys and
every column's read memo of them dropped, and the processors SQLAlchemy
built for the engine's dialect forgotten, so its next statement is refused
as an engine never bound is.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from contextvars import ContextVar
from typing import Any, Callable, Iterator

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import mapperlib

from ..errors import ConfigurationError
from ..providers.base import DATA_KEY_BYTES, Context, DataKey, KeyProvider
from .listeners import Listeners
from .offload import require_greenlet
from .live import LiveKeys, live_of
from .store import KeyStore
from .tracking import Tracker

__all__ = ["Binding", "Engines", "engine_name", "executing_on", "sync_engine"]

_urls: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()  # dialect -> its engine's URL
_executing: ContextVar[Connection | None] = ContextVar("sa_envelope_executing", default=None)
_listening = False
_listen_lock = threading.Lock()


def engine_name(engine: Any) -> str:
    """An engine's URL without its password, as errors print it."""
    return str(engine.url.render_as_string(hide_password=True))


def _learn_url(conn: Connection) -> None:
    dialect = conn.dialect
    if dialect not in _urls:
        _urls[dialect] = engine_name(conn.engine)


def _note_executing(conn: Connection, *args: Any) -> None:
    _executing.set(conn)


def _listen_for_urls() -> None:
    """Learn the URL of every engine's dialect as it connects, and the
    connection executing in each thread or task (once per process)."""
    global _listening
    with _listen_lock:
        if not _listening:
            event.listen(Engine, "engine_connect", _learn_url)
            event.listen(Engine, "before_execute", _note_executing)
            _listening = True


@contextlib.contextmanager
def executing_on(conn: Connection) -> Iterator[Connection]:
    """Serve as if a statement executed on ``conn`` (a job's own transaction)."""
    token = _executing.set(conn)
    try:
        yield conn
    finally:
        _executing.reset(token)


def sync_engine(engine: Any) -> Engine:
    """The sync ``Engine`` of an Engine or AsyncEngine (which needs greenlet)."""
    if hasattr(engine, "sync_engine"):  # an AsyncEngine: say which extra, before SQLAlchemy does
        require_greenlet()
        engine = engine.sync_engine
    if not isinstance(engine, Engine):
        raise ConfigurationError(f"bind() takes an Engine or an AsyncEngine, not {type(engine).__name__}")
    return engine


class Binding:
    """One bound engine: its tracker and its store (with its own key cache).

    ``rows`` is that engine's row keys (:class:`sa_envelope.rows.keys.RowKeys`),
    made by the manager once a row-scoped column exists. ``listeners``: every
    event listener installed for it (the tracker's). What others keep for it
    (a column's state for this engine) registers with :meth:`on_close`.
    """

    __slots__ = ("_closers", "engine", "live", "rows", "store", "tracker")

    def __init__(self, engine: Engine, tracker: Tracker, store: KeyStore, live: LiveKeys) -> None:
        self.engine = engine
        self.tracker = tracker
        self.store = store
        self.live = live  # its deterministic and blind-index keys during rotations
        self.rows: Any = None
        self._closers: list[Callable[[], None]] = []

    @property
    def listeners(self) -> Listeners:
        return self.tracker.listeners

    def on_close(self, forget: Callable[[], None]) -> None:
        """Call ``forget`` when this binding is unbound (drops state kept elsewhere for it)."""
        self._closers.append(forget)

    def close(self, refusal: Callable[[], ConfigurationError]) -> None:
        """Unbound: remove its listeners, forget every plaintext key it holds,
        and refuse every key it would load or make from now on with
        ``refusal()`` (processors built for it may outlive the unbind in
        caches of SQLAlchemy's own, such as a mapper's compiled statements:
        with an empty cache, each of them needs the provider)."""
        self.listeners.remove()
        self.store.provider = _Refusing(refusal)
        self.store.clear()
        self.live.close()
        if self.rows is not None:
            self.rows.cache.clear()
        closers, self._closers = self._closers, []
        for forget in closers:
            forget()

    def __repr__(self) -> str:
        return f"Binding({engine_name(self.engine)!r})"


class _Refusing(KeyProvider):
    """The provider of an unbound binding's store: every call raises what a
    statement on an engine never bound gets. It trusts every wrapping key,
    so that the refusal is this error, not an untrusted key's."""

    def __init__(self, refusal: Callable[[], ConfigurationError]) -> None:
        self._refusal = refusal

    @property
    def wrapping_key_id(self) -> str:
        return "unbound"

    def trusts(self, wrapping_key_id: str) -> bool:
        return True

    def wrap(self, plaintext: bytes, context: Context) -> DataKey:
        raise self._refusal()

    def unwrap(self, wrapped: bytes, context: Context, wrapping_key_id: str) -> bytes:
        raise self._refusal()

    def generate(self, context: Context, size: int = DATA_KEY_BYTES) -> DataKey:
        raise self._refusal()


def _forget_processors(engine: Engine) -> None:
    """Drop the statements and processors SQLAlchemy built for ``engine``'s
    dialect: they are rebuilt for the binding as it is now (or for none).
    Besides the engine's compiled cache, the ORM keeps the INSERT/UPDATE/
    DELETE statements of each mapper's flushes in a cache of the mapper's,
    keyed by dialect first."""
    engine.clear_compiled_cache()
    dialect = engine.dialect
    memos = getattr(dialect, "_type_memos", None)  # SQLAlchemy's per-dialect processor cache
    if memos is not None:
        memos.clear()
    for mapper in _mappers():
        cache: Any = mapper.__dict__.get("_compiled_cache", {})  # made on first flush (memoized)
        for key in [k for k in list(cache) if isinstance(k, tuple) and k and k[0] is dialect]:
            cache.pop(key, None)


def _mappers() -> Iterator[Any]:
    """Every mapper made so far. A class another thread is still declaring is
    registered before its mapper exists, and ``registry.mappers`` raises
    ``UnmappedClassError`` for it; it has flushed nothing, so it is skipped."""
    for registry in mapperlib._all_registries():
        for manager in list(registry._managers):  # SQLAlchemy copies it the same way
            if manager.is_mapped:
                yield manager.mapper


class Engines:
    """The bindings of one KeyManager, by dialect; ``make`` wires a new one."""

    def __init__(self, make: Callable[[Engine], Binding]) -> None:
        self._make = make
        self._bindings: dict[Dialect, Binding] = {}
        self._lock = threading.Lock()
        _listen_for_urls()

    def bind(self, engine: Any) -> Binding:
        """Bind ``engine`` (idempotent). Processors SQLAlchemy built for its
        dialect before (which refuse values) are dropped, so a late bind works."""
        sync = sync_engine(engine)
        with self._lock:
            binding = self._bindings.get(sync.dialect)
            if binding is not None:
                return binding
            binding = self._bindings[sync.dialect] = self._make(sync)
        _urls[sync.dialect] = engine_name(sync)
        _forget_processors(sync)
        return binding

    def unbind(self, engine: Any) -> Binding | None:
        """Stop serving ``engine`` (an Engine or AsyncEngine; the binding of
        its dialect); ``None`` if it was not bound. Its statements are refused
        from then on, as those of an engine never bound; it may be bound again."""
        sync = sync_engine(engine)
        with self._lock:
            binding = self._bindings.pop(sync.dialect, None)
        if binding is not None:
            binding.close(lambda: self.not_bound(sync.dialect))
            _forget_processors(sync)
        return binding

    def get(self, dialect: Any) -> Binding | None:
        """The binding of a statement's dialect, ``None`` when not bound."""
        return self._bindings.get(dialect)

    def of(self, bind: Connection | Engine) -> Binding:
        """The binding of the engine ``bind`` (a Connection or Engine) belongs to."""
        binding = self._bindings.get(bind.dialect)
        if binding is None:
            raise self.not_bound(bind.dialect, engine_name(bind.engine))
        return binding

    def select(self, engine: Any = None) -> Binding:
        """Where a management operation runs: on ``engine`` (an Engine,
        AsyncEngine or Connection), else on the one bound engine."""
        if engine is not None:
            return self.of(engine if isinstance(engine, Connection) else sync_engine(engine))
        bindings = list(self._bindings.values())
        if len(bindings) == 1:
            return bindings[0]
        if not bindings:
            raise ConfigurationError("this KeyManager is bound to no engine: call keys.bind(engine) first")
        names = ", ".join(repr(engine_name(b.engine)) for b in bindings)
        raise ConfigurationError(f"this KeyManager is bound to {len(bindings)} engines ({names}): pass engine=")

    def current(self) -> Binding:
        """The binding of the connection executing in this thread or task
        (an open one: a query's keys are computed as it executes), else the
        one bound engine; an unbound engine's statement is refused."""
        conn = _executing.get()
        if conn is None or conn.closed:
            return self.select()
        return self.of(conn)

    def live_for(self, bind: Any) -> LiveKeys:
        """The live keys of ``bind``: a KeyStore, an Engine or Connection, or
        ``None``: those of :meth:`current`."""
        if isinstance(bind, KeyStore):  # maybe another manager's (a job run by it over these columns)
            return live_of(bind)
        if bind is not None:
            return self.select(bind).live
        return self.current().live

    def not_bound(self, dialect: Any, name: str | None = None) -> ConfigurationError:
        """The error for a statement on an engine this manager is not bound to."""
        if not self._bindings:
            return ConfigurationError("this KeyManager is bound to no engine: call keys.bind(engine) first")
        name = name or _urls.get(dialect) or f"an engine of dialect {getattr(dialect, 'name', '?')}"
        return ConfigurationError(
            f"the KeyManager is not bound to engine {name!r}: call keys.bind(engine) for it "
            "(keys are stored in the database of the engine a statement runs on)"
        )

    def __iter__(self) -> Iterator[Binding]:
        return iter(list(self._bindings.values()))

    def __len__(self) -> int:
        return len(self._bindings)
