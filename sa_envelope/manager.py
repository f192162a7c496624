"""KeyManager: the facade users hold. It wires, and delegates; it decides nothing.

``KeyManager(engine, provider)`` is ``KeyManager(None, provider)`` followed
by ``bind(engine)``. Every bound engine (:mod:`sa_envelope.keys.engines`)
gets its own key cache, tracker, store, live keys and (with a row-scoped
column) row keys, wired here; the jobs get a store, never the manager
(docs/architecture.md draws the pieces). The column types bind the store of
a statement's engine into their processors once per dialect, so the
per-value path gains no call layer from this facade. Management calls take
``engine=``; with one bound engine it is the default.
"""

from __future__ import annotations

import threading
from typing import Any, ContextManager, Iterable

from sqlalchemy import Column, Connection, Engine, MetaData, Table

from .columns import flushcheck
from .columns.portable import adopt as adopt_declarations
from .columns.rowvalue import RowKey
from .columns.guardrows import guard_table
from .envelope import format as fmt
from .jobs import warm as warming
from .jobs.reencrypt import ReencryptReport, reencrypt_columns
from .jobs.rewrap import RewrapReport, rewrap_keys
from .jobs.guardsweep import GuardSweepReport, sweep_guards
from .jobs.sweep import SweepReport, sweep_orphans
from .keys import registry, table as kt
from .keys.cache import CacheLimits, CachedKey
from .keys.engines import Binding, Engines
from .keys.live import LiveKeys, LivePolicy
from .keys.rollover import RolloverPolicy
from .keys.store import KeyStore
from .keys.tracking import Tracker
from .providers.base import KeyProvider
from .wiring import Settings, wire_engine, wire_rows
from .rows.binding import bound_row_key
from .rows.keys import RowKeys
from .rows.orm import install_orm_hooks
from .rows.shred import shred_instance, shred_table_row
from .search import writes as search_writes
from .search.tokens import token_table
from .search.verify import IndexReport, verify_index

__all__ = ["KeyManager"]


class KeyManager:
    """Owns the key table, the plaintext key caches and key creation.

    ``engine`` is the Engine (or AsyncEngine) your sessions use, or ``None``
    for an application factory that makes its engines later: call
    :meth:`bind` for each (any number, sync or async). Every bound engine has
    its own key cache, and a key is looked up and created through the
    connection of the statement that needs it, so a value is sealed under a
    key stored in its row's database and transaction; a statement on an
    engine that is not bound raises :class:`ConfigurationError` naming it
    (:mod:`sa_envelope.keys.engines`). ``metadata`` lets the key table live
    in your own MetaData so that Alembic autogenerate sees it.
    ``namespace`` is bound into every new key's provider context, so two
    applications sharing one CMK cannot use each other's keys.
    ``shred_on_delete=False`` keeps the row keys of rows deleted through the
    ORM (by default they are shredded in the deleting transaction). No
    network or database call happens here.
    """

    def __init__(
        self,
        engine: Any,
        provider: KeyProvider,
        *,
        cache: CacheLimits | None = None,
        metadata: MetaData | None = None,
        table_name: str = kt.KEY_TABLE_NAME,
        rollover: RolloverPolicy | None = None,
        namespace: str | None = None,
        shred_on_delete: bool = True,
        live: LivePolicy | None = None,
    ) -> None:
        self.table = kt.key_table(metadata if metadata is not None else MetaData(), table_name)
        self.search_table = token_table(self.table.metadata, table_name)  # search index tokens
        self.rollover = rollover if rollover is not None else RolloverPolicy()
        self.namespace = namespace
        self.shred_on_delete = shred_on_delete  # ORM delete shreds the row's keys (rows.orm)
        self._provider = provider
        self._settings = Settings(provider, self.table, cache or CacheLimits(), self.rollover, namespace, live)
        self._row_scope = False  # made with the first row-scoped column (row keys per engine)
        self._lock = threading.RLock()
        self.engines = Engines(self._wire)
        self.pickle_token = registry.enrol(self)  # what a pickled declaration names this manager by
        flushcheck.install()  # values refused before the flush builds its parameters
        search_writes.install()  # search-index tokens follow every write (sa_envelope.search)
        if engine is not None:
            self.bind(engine)

    # -- engines (keys.engines) -----------------------------------------------------------

    def bind(self, engine: Any) -> Any:
        """Serve ``engine`` (an Engine or AsyncEngine) too; idempotent. Its
        keys live in its own database's key table. Returns ``engine``."""
        with self._lock:  # a binding made while row scope is switched on gets its row keys
            self.engines.bind(engine)
        return engine

    def adopt(self, *targets: MetaData | Table) -> int:
        """Attach this manager to each declaration of ``targets`` without one (unpickled elsewhere): a count."""
        return adopt_declarations(self, *targets)

    def unbind(self, engine: Any) -> Any:
        """Stop serving ``engine`` (an Engine or AsyncEngine; nothing if not bound): its listeners
        removed, its plaintext keys dropped, its statements refused as if never bound. Returns it."""
        with self._lock:
            self.engines.unbind(engine)
        return engine

    def _wire(self, engine: Engine) -> Binding:
        """The pieces that serve one engine (:mod:`.wiring`; under the lock)."""
        self._settings.provider = self._provider
        binding = wire_engine(self._settings, engine)
        if self._row_scope:
            wire_rows(self, binding)
        return binding

    def use_row_scope(self) -> None:
        """Row keys for every bound engine, now and later, with the ORM hooks
        and the read prefetch (a row-scoped column calls this once)."""
        if self._row_scope:
            return
        with self._lock:
            if self._row_scope:
                return
            install_orm_hooks()
            self._row_scope = True
            for binding in self.engines:
                wire_rows(self, binding)

    @property
    def engine(self) -> Engine:
        """The one bound engine (``ConfigurationError`` if none, or several)."""
        return self.engines.select().engine

    @property
    def store(self) -> KeyStore:
        """The key store of the one bound engine (see :meth:`store_for`)."""
        return self.engines.select().store

    @property
    def tracker(self) -> Tracker:
        return self.engines.select().tracker

    @property
    def live(self) -> LiveKeys:
        """The live deterministic and blind-index keys of the one bound engine (keys.live)."""
        return self.engines.select().live

    def live_for(self, bind: Any) -> LiveKeys:
        """The live keys of ``bind``'s database: a KeyStore, Engine or
        Connection; ``None``: the statement executing now, else the one bound engine."""
        return self.engines.live_for(bind)

    def store_for(self, bind: Any = None) -> KeyStore:
        """The key store of ``bind`` (Engine, AsyncEngine or Connection), else of the one bound engine."""
        return self.engines.select(bind).store

    # -- what the store holds ------------------------------------------------------------

    @property
    def provider(self) -> KeyProvider:
        """The provider that wraps new keys (``rewrap`` may replace it)."""
        return self._provider

    @provider.setter
    def provider(self, provider: KeyProvider) -> None:
        self._provider = provider
        for binding in self.engines:
            binding.store.provider = provider

    @property
    def provider_calls(self) -> int:
        return sum(b.store.provider_calls for b in self.engines)

    @property
    def keys_created(self) -> int:
        return sum(b.store.keys_created for b in self.engines)

    def encryption_key(self, owner: str, scope: str = kt.SCOPE_TABLE) -> CachedKey:
        """The key new values of ``owner`` are written under (see KeyStore)."""
        return self.store.encryption_key(owner, scope)

    def decryption_key(self, key_id: int, *, table: str, column: str) -> CachedKey:
        """The key a stored value names in its header (see KeyStore)."""
        return self.store.decryption_key(key_id, table=table, column=column)

    def use_connection(self, conn: Connection) -> ContextManager[Connection]:
        """Bind values through ``conn`` (of a bound engine) where no statement
        is running on it: new keys are then written in its transaction."""
        return self.engines.of(conn).tracker.use_connection(conn)

    # -- the key table and the cache (engine=: see keys.engines.Engines.select) ----------

    def create_table(self, engine: Any = None) -> None:
        """Create the key table, the search-token table and the uniqueness
        guards' table if they do not exist (idempotent)."""
        bound = self.engines.select(engine).engine
        for table in self._own_tables():
            table.create(bound, checkfirst=True)

    async def create_table_async(self, engine: Any = None) -> None:
        """:meth:`create_table` for a KeyManager bound to an AsyncEngine."""
        bound = self.engines.select(engine).engine
        for table in self._own_tables():
            await warming.create_table_async(bound, table)

    def _own_tables(self) -> list[Table]:
        """The library's tables: keys, search-index tokens, uniqueness guards."""
        return [self.table, self.search_table, guard_table(self.table.metadata, self.table.name)]

    def stats(self) -> dict[str, int]:
        """Counters over every bound engine: provider calls, cache hits and
        misses, keys created."""
        stores = [b.store for b in self.engines]
        return {
            "provider_calls": sum(s.provider_calls for s in stores),
            "cache_hits": sum(s.cache.hits for s in stores),
            "cache_misses": sum(s.cache.misses for s in stores),
            "cache_evictions": sum(s.cache.evictions for s in stores),
            "cached_keys": sum(len(s.cache) for s in stores),
            "keys_created": sum(s.keys_created for s in stores),
        }

    def clear_cache(self) -> None:
        """Forget every plaintext key of every engine (the next use unwraps again)."""
        for binding in self.engines:
            binding.store.clear()
            binding.live.invalidate()
            if binding.rows is not None:
                binding.rows.cache.clear()

    def warm(self, tables: Iterable[Any] | None = None, *, engine: Any = None) -> int:
        """Load the keys of ``tables`` (names or Table objects; default all)
        into the cache now, so that first requests make no provider call."""
        return warming.warm(self.engines.select(engine).store, tables)

    async def warm_async(self, tables: Iterable[Any] | None = None, *, engine: Any = None) -> int:
        """:meth:`warm` for asyncio; provider calls run in worker threads."""
        return await warming.warm_async(self.engines.select(engine).store, tables)

    # -- rotation (docs/rotation.md) -----------------------------------------------------

    def rotate_table_key(self, table: str, scope: str = kt.SCOPE_TABLE, *, engine: Any = None) -> int:
        """Make a new key of ``scope`` (``"table"``, ``"deterministic"``,
        ``"blind-index"``) for ``table`` now; older keys stay for reading.

        Runs in a transaction of its own and returns the new key id. No value
        is re-encrypted (see :meth:`reencrypt`). A deterministic or
        blind-index key is matched by queries at once and written under
        after ``LivePolicy.grace`` (docs/rotation.md).
        """
        binding = self.engines.select(engine)
        if scope == kt.SCOPE_DETERMINISTIC:  # UNIQUE across the live keys needs its guard rows (columns/uniqueness)
            guard_table(binding.store.table.metadata, binding.store.table.name).create(
                binding.store.engine, checkfirst=True
            )
        new_id = binding.store.rotate(table, scope)
        binding.live.invalidate(table)
        return new_id

    def rewrap(self, to: KeyProvider | None = None, *, source: KeyProvider | None = None, batch_size: int = 100,
               progress: bool | None = None, engine: Any = None) -> RewrapReport:  # fmt: skip
        """Re-wrap every provider-wrapped key of one database under ``to``
        (default: ``self.provider``).

        ``source`` unwraps keys where ``to`` cannot move them itself (KMS
        ``ReEncrypt`` needs none); it defaults to the current provider. Once
        every key is moved, that engine's new keys are wrapped by ``to``, and
        ``self.provider`` becomes ``to`` once every bound engine's are.
        """
        binding = self.engines.select(engine)
        target = to if to is not None else self.provider
        current = binding.store.provider
        report = rewrap_keys(binding.store, source or current, target, batch_size=batch_size, progress=progress)
        if report.complete:
            binding.store.provider = target
            if all(b.store.provider is target for b in self.engines):
                self._provider = target
        return report

    def reencrypt(self, columns: Iterable[Column[Any]], *, key_id: int | str, batch_size: int = 500, workers: int = 1,
                  rate: float | None = None, max_batches: int | None = None, progress: bool | None = None,
                  engine: Any = None) -> ReencryptReport:  # fmt: skip
        """Re-encrypt the values of ``columns`` stored under ``key_id`` with the
        current key (rotated first if ``key_id`` is still the current one).

        ``columns`` are table columns declared with ``EncryptedType`` or
        ``BlindIndexType``; for a blind-index key, the search indexes of
        their table are rebuilt too (give an indexed column if the table
        has no ``BlindIndexType``). ``workers`` threads share the rows through the
        database (``FOR UPDATE SKIP LOCKED``); ``rate`` caps rows per second
        over all of them; ``max_batches`` stops each worker after that many
        batches (run again to resume). Once nothing is left, a deterministic
        or blind-index key is retired: queries match one key again.
        """
        binding = self.engines.select(engine)
        return reencrypt_columns(binding.store, binding.live, list(columns), key_id=key_id, batch_size=batch_size,
                                 workers=workers, rate=rate, max_batches=max_batches, progress=progress)  # fmt: skip

    def verify_index(self, table: Table, *, fix: bool = False, batch_size: int = 500,
                     max_batches: int | None = None, engine: Any = None) -> list[IndexReport]:  # fmt: skip
        """Check that every search-index token of ``table`` matches its row's value
        under a live blind-index key; ``fix=True`` rebuilds the rows that differ or
        are under an older key, and backfills a new index (docs/querying.md)."""
        bound = self.engines.select(engine).engine
        return verify_index(bound, table, fix=fix, batch_size=batch_size, max_batches=max_batches)

    # -- row scope and crypto-shredding (docs/shredding.md) ------------------------------

    @property
    def rows(self) -> RowKeys:
        """The row keys of the one bound engine (see :meth:`rows_for`)."""
        return self.rows_for(None)

    def rows_for(self, bind: Any) -> RowKeys:
        """The row keys of ``bind``'s engine (a Connection, Engine or
        AsyncEngine; ``None``: the one bound engine). The first call makes
        row keys for every engine, with the ORM hooks and the read prefetch."""
        self.use_row_scope()
        rows: RowKeys = self.engines.select(bind).rows
        return rows

    def new_row_keys(self, conn: Connection, table: str, count: int) -> list[RowKey]:
        """``count`` new row keys for ``table``, inserted on ``conn`` (Core API):
        ``conn.execute(insert(t), [{"notes": k.value(v)} for k, v in zip(keys, values)])``."""
        return [RowKey(k, table) for k in self.rows_for(conn).create(conn, table, count)]

    def new_row_key(self, conn: Connection, table: str, primary_key: Any = None) -> RowKey:
        """One new row key for a row of ``table``, inserted on ``conn``; bound to
        the row (:mod:`sa_envelope.rows.binding`) when its ``primary_key`` is given."""
        if primary_key is None:
            return self.new_row_keys(conn, table, 1)[0]
        pk = tuple(primary_key) if isinstance(primary_key, (tuple, list)) else (primary_key,)
        return RowKey(bound_row_key(self.rows_for(conn), conn, table, pk), table)

    def shred(self, instance: Any) -> list[str]:
        """Crypto-shred an ORM instance's row: destroy its row key in the
        session's transaction (commit to make it final). Its row-scoped
        attributes then load as ``None``. Returns the shredded key ids."""
        return [fmt.format_key_id(k) for k in shred_instance(self, instance)]

    def shred_row(
        self, table: Table | str, primary_key: Any, conn: Connection | None = None, *, engine: Any = None
    ) -> list[str]:
        """Core: shred every row key the row of ``table`` with ``primary_key``
        (a value, or a tuple for a composite key) ever had, whether or not a
        stored value still names it; on ``conn`` or in a transaction of its
        own (on ``engine``). Returns the shredded key ids."""
        pk = tuple(primary_key) if isinstance(primary_key, (tuple, list)) else (primary_key,)
        if conn is not None:
            return [fmt.format_key_id(k) for k in shred_table_row(self, conn, table, pk)]
        with self.engines.select(engine).engine.begin() as own:
            return [fmt.format_key_id(k) for k in shred_table_row(self, own, table, pk)]

    def sweep_orphans(
        self,
        dry_run: bool = True,
        *,
        tables: Iterable[Table] = (),
        batch_size: int = 500,
        progress: bool | None = None,
        engine: Any = None,
    ) -> SweepReport:
        """Find the row keys bound to rows that no longer exist (deleted by
        raw SQL, ``TRUNCATE``, cascades) and, unless ``dry_run``, shred them
        in batches; run again to resume. ``tables`` gives the declared tables
        (otherwise reflected). See docs/shredding.md."""
        rows = self.rows_for(engine)
        return sweep_orphans(rows, dry_run=dry_run, tables=tables, batch_size=batch_size, progress=progress)

    def sweep_guards(self, table: str | None = None, *, dry_run: bool = False, engine: Any = None) -> GuardSweepReport:
        """Delete (``dry_run``: count) the uniqueness guard rows of ``table``
        (default: every table) that no rotation in progress needs; uses no key
        material. Safe beside writers and rotations: docs/rotation.md."""
        store = self.engines.select(engine).store
        return sweep_guards(store.engine, store.table, table, dry_run=dry_run)

    def shred_key(self, key_id: int | str, conn: Connection | None = None, *, engine: Any = None) -> None:
        """Destroy one row key's material, on ``conn`` (the caller's transaction) or in its own (``engine``)."""
        kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
        if conn is not None:
            self.rows_for(conn).shred_key(conn, kid)
            return
        binding = self.engines.select(engine)
        with binding.engine.begin() as own:
            self.rows_for(own).shred_key(own, kid)

    def __repr__(self) -> str:
        return f"KeyManager(table={self.table.name!r}, provider={self.provider!r})"
