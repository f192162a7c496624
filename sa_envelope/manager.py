"""KeyManager: the facade users hold. It wires, and delegates; it decides nothing.

``KeyManager(engine, provider)`` makes the pieces and connects them:

* a :class:`~sa_envelope.keys.cache.KeyCache` of plaintext keys, bounded;
* a :class:`~sa_envelope.keys.tracking.Tracker` on the engine, which knows
  the executing connection and which transaction made which key, and runs
  the query guards before each statement (:mod:`sa_envelope.columns.guard`)
  and once per compiled statement (:mod:`sa_envelope.columns.comparisons`);
* a :class:`~sa_envelope.keys.store.KeyStore`, which finds, creates and
  unwraps keys and rolls them over (the rules live there);
* the row keys (:mod:`sa_envelope.rows`), made with the first row-scoped column;
* the jobs (:mod:`sa_envelope.jobs`), which get the store, never the manager.

The column types bind the store's lookups into their processors directly,
so the per-value path gains no call layer from this facade.
"""

from __future__ import annotations

import threading
from typing import Any, ContextManager, Iterable

from sqlalchemy import Column, Connection, Engine, MetaData, Table

from . import redact
from .columns.comparisons import check_compiled
from .columns import flushcheck
from .columns.guard import check_statement
from .columns.rowvalue import RowKey
from .envelope import format as fmt
from .jobs import warm as warming
from .jobs.reencrypt import ReencryptReport, reencrypt_columns
from .jobs.rewrap import RewrapReport, rewrap_keys
from .jobs.sweep import SweepReport, sweep_orphans
from .keys import table as kt
from .keys.cache import CacheLimits, CachedKey, KeyCache
from .keys.offload import require_greenlet
from .keys.rollover import RolloverPolicy
from .keys.store import KeyStore
from .keys.tracking import Tracker
from .providers.base import KeyProvider
from .rows.binding import bound_row_key
from .rows.keys import RowKeys
from .rows.orm import install_orm_hooks
from .rows.shred import shred_instance, shred_table_row
from .rows.prefetch import install_prefetch
from .search import writes as search_writes
from .search.tokens import token_table
from .search.verify import IndexReport, verify_index

__all__ = ["KeyManager"]


class KeyManager:
    """Owns the key table, the plaintext key cache and key creation.

    ``engine`` is the Engine (or AsyncEngine) your sessions use: the manager
    listens to its connections to learn which transaction a value is bound
    in. ``metadata`` lets the key table live in your own MetaData so that
    Alembic autogenerate sees it. ``namespace`` is bound into every new
    key's provider context, so two applications sharing one CMK cannot use
    each other's keys. ``shred_on_delete=False`` keeps the row keys of rows
    deleted through the ORM (by default they are shredded in the deleting
    transaction). No network or database call happens here.
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
    ) -> None:
        if hasattr(engine, "sync_engine"):  # an AsyncEngine: say which extra, before SQLAlchemy does
            require_greenlet()
        self.engine: Engine = getattr(engine, "sync_engine", engine)
        self.table = kt.key_table(metadata if metadata is not None else MetaData(), table_name)
        self.search_table = token_table(self.table.metadata, table_name)  # search index tokens
        self.rollover = rollover if rollover is not None else RolloverPolicy()
        key_cache = KeyCache(cache or CacheLimits())
        self.tracker = Tracker(self.engine, key_cache, on_execute=check_statement, on_compiled=check_compiled)
        self.store = KeyStore(
            self.engine, provider, self.table, key_cache, self.tracker, self.rollover, namespace=namespace
        )
        self.shred_on_delete = shred_on_delete  # ORM delete shreds the row's keys (rows.orm)
        self._rows: RowKeys | None = None
        self._lock = threading.Lock()
        redact.hide_rows(self.engine)  # SQLAlchemy logs rows after decryption
        flushcheck.install()  # values refused before the flush builds its parameters
        search_writes.install()  # search-index tokens follow every write (sa_envelope.search)

    # -- what the store holds ------------------------------------------------------------

    @property
    def provider(self) -> KeyProvider:
        """The provider that wraps new keys (``rewrap`` may replace it)."""
        return self.store.provider

    @provider.setter
    def provider(self, provider: KeyProvider) -> None:
        self.store.provider = provider

    @property
    def provider_calls(self) -> int:
        return self.store.provider_calls

    @property
    def keys_created(self) -> int:
        return self.store.keys_created

    def encryption_key(self, owner: str, scope: str = kt.SCOPE_TABLE) -> CachedKey:
        """The key new values of ``owner`` are written under (see KeyStore)."""
        return self.store.encryption_key(owner, scope)

    def decryption_key(self, key_id: int, *, table: str, column: str) -> CachedKey:
        """The key a stored value names in its header (see KeyStore)."""
        return self.store.decryption_key(key_id, table=table, column=column)

    def use_connection(self, conn: Connection) -> ContextManager[Connection]:
        """Bind values through ``conn`` (for connections of another engine,
        such as Alembic's): new keys are then written in its transaction."""
        return self.tracker.use_connection(conn)

    # -- the key table and the cache -----------------------------------------------------

    def create_table(self) -> None:
        """Create the key table and the search-token table if they do not exist (idempotent)."""
        self.table.create(self.engine, checkfirst=True)
        self.search_table.create(self.engine, checkfirst=True)

    async def create_table_async(self) -> None:
        """:meth:`create_table` for a KeyManager built on an AsyncEngine."""
        await warming.create_table_async(self.engine, self.table)
        await warming.create_table_async(self.engine, self.search_table)

    def stats(self) -> dict[str, int]:
        """Counters: provider calls, cache hits and misses, keys created."""
        cache = self.store.cache
        return {
            "provider_calls": self.store.provider_calls,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "cache_evictions": cache.evictions,
            "cached_keys": len(cache),
            "keys_created": self.store.keys_created,
        }

    def clear_cache(self) -> None:
        """Forget every plaintext key (the next use unwraps again)."""
        self.store.clear()
        if self._rows is not None:
            self._rows.cache.clear()

    def warm(self, tables: Iterable[Any] | None = None) -> int:
        """Load the keys of ``tables`` (names or Table objects; default all)
        into the cache now, so that first requests make no provider call."""
        return warming.warm(self.store, tables)

    async def warm_async(self, tables: Iterable[Any] | None = None) -> int:
        """:meth:`warm` for asyncio; provider calls run in worker threads."""
        return await warming.warm_async(self.store, tables)

    # -- rotation (docs/rotation.md) -----------------------------------------------------

    def rotate_table_key(self, table: str) -> int:
        """Make a new active key for ``table`` now; older keys stay for reading.

        Runs in a transaction of its own and returns the new key id. No value
        is re-encrypted (see :meth:`reencrypt` for that).
        """
        return self.store.rotate(table, kt.SCOPE_TABLE)

    def rewrap(
        self,
        to: KeyProvider | None = None,
        *,
        source: KeyProvider | None = None,
        batch_size: int = 100,
        progress: bool | None = None,
    ) -> RewrapReport:
        """Re-wrap every provider-wrapped key under ``to`` (default: ``self.provider``).

        ``source`` unwraps keys where ``to`` cannot move them itself (KMS
        ``ReEncrypt`` needs none); it defaults to the current provider. Once
        every key is moved, ``self.provider`` becomes ``to``, so new keys are
        wrapped by it too.
        """
        target = to if to is not None else self.provider
        report = rewrap_keys(self.store, source or self.provider, target, batch_size=batch_size, progress=progress)
        if report.complete:
            self.provider = target
        return report

    def reencrypt(
        self, columns: Iterable[Column[Any]], *, key_id: int | str, batch_size: int = 500, progress: bool | None = None
    ) -> ReencryptReport:
        """Re-encrypt the values of ``columns`` stored under ``key_id`` with the
        active key (rolled over first if ``key_id`` is still active).

        ``columns`` are table columns declared with ``EncryptedType``; once
        the report shows nothing left, the old key encrypts nothing any more
        and may be shredded.
        """
        return reencrypt_columns(self.store, list(columns), key_id=key_id, batch_size=batch_size, progress=progress)

    def verify_index(self, table: Table, *, fix: bool = False, batch_size: int = 500) -> list[IndexReport]:
        """Check that every search-index token of ``table`` matches its row's
        value; ``fix=True`` rebuilds the rows that differ (and backfills a new
        index). See docs/querying.md."""
        return verify_index(self.engine, table, fix=fix, batch_size=batch_size)

    # -- row scope and crypto-shredding (docs/shredding.md) ------------------------------

    @property
    def rows(self) -> RowKeys:
        """The row keys of this manager. Made with the first row-scoped column,
        which also installs the ORM hooks and the read prefetch."""
        rows = self._rows
        if rows is None:
            with self._lock:
                rows = self._rows
                if rows is None:
                    rows = RowKeys(self.store)
                    install_prefetch(rows, self)
                    install_orm_hooks()
                    self._rows = rows
        return rows

    def new_row_keys(self, conn: Connection, table: str, count: int) -> list[RowKey]:
        """``count`` new row keys for ``table``, inserted on ``conn`` (Core API):
        ``conn.execute(insert(t), [{"notes": k.value(v)} for k, v in zip(keys, values)])``."""
        return [RowKey(k, table) for k in self.rows.create(conn, table, count)]

    def new_row_key(self, conn: Connection, table: str, primary_key: Any = None) -> RowKey:
        """One new row key for a row of ``table``, inserted on ``conn``; bound to
        the row (:mod:`sa_envelope.rows.binding`) when its ``primary_key`` is given."""
        if primary_key is None:
            return self.new_row_keys(conn, table, 1)[0]
        pk = tuple(primary_key) if isinstance(primary_key, (tuple, list)) else (primary_key,)
        return RowKey(bound_row_key(self.rows, conn, table, pk), table)

    def shred(self, instance: Any) -> list[str]:
        """Crypto-shred an ORM instance's row: destroy its row key in the
        session's transaction (commit to make it final). Its row-scoped
        attributes then load as ``None``. Returns the shredded key ids."""
        return [fmt.format_key_id(k) for k in shred_instance(self, instance)]

    def shred_row(self, table: Table | str, primary_key: Any, conn: Connection | None = None) -> list[str]:
        """Core: shred every row key the row of ``table`` with ``primary_key``
        (a value, or a tuple for a composite key) ever had, whether or not a
        stored value still names it; on ``conn`` or in a transaction of its
        own. Returns the shredded key ids."""
        pk = tuple(primary_key) if isinstance(primary_key, (tuple, list)) else (primary_key,)
        if conn is not None:
            return [fmt.format_key_id(k) for k in shred_table_row(self, conn, table, pk)]
        with self.engine.begin() as own:
            return [fmt.format_key_id(k) for k in shred_table_row(self, own, table, pk)]

    def sweep_orphans(
        self, dry_run: bool = True, *, tables: Iterable[Table] = (), batch_size: int = 500, progress: bool | None = None
    ) -> SweepReport:
        """Find the row keys bound to rows that no longer exist (deleted by
        raw SQL, ``TRUNCATE``, cascades) and, unless ``dry_run``, shred them
        in batches; run again to resume. ``tables`` gives the declared tables
        (otherwise reflected). See docs/shredding.md."""
        return sweep_orphans(self.rows, dry_run=dry_run, tables=tables, batch_size=batch_size, progress=progress)

    def shred_key(self, key_id: int | str, conn: Connection | None = None) -> None:
        """Destroy one row key's material, on ``conn`` (the caller's
        transaction) or, without it, in a transaction of its own."""
        kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
        if conn is not None:
            self.rows.shred_key(conn, kid)
            return
        with self.engine.begin() as own:
            self.rows.shred_key(own, kid)

    def __repr__(self) -> str:
        return f"KeyManager(table={self.table.name!r}, provider={self.provider!r})"
