"""KeyManager: the key table, the key cache and the rules that keep data safe.

The one rule everything here serves: **no value is ever written under a key
that is not durably stored.** A new table key is inserted on the same
connection, in the same transaction, as the first value that uses it, so the
key and its values commit or roll back together (and SQLite's single writer
is never asked for a second connection). A key is trusted process-wide only
once it has been *read back* from the key table by a transaction that did
not create it, which proves it committed. Until then it is known only to the
connection that made it, and forgotten if that connection rolls back.

The per-value path (:meth:`KeyManager.encryption_key`,
:meth:`KeyManager.decryption_key`) is two dict lookups once a key is cached;
only a miss does I/O.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy import Connection, Engine, MetaData, event
from sqlalchemy.exc import SQLAlchemyError

from . import _format as fmt
from . import _keytable as kt
from . import _async, _redact
from ._async import run_blocking
from ._blindindex import HmacKey
from ._cache import CacheLimits, CachedKey, KeyCache
from ._errors import DecryptionError, EnvelopeError, KeyNotFoundError
from ._faults import fault_point
from ._providers import KeyProvider
from ._query import check_statement
from ._rollover import RolloverPolicy

__all__ = ["KeyManager"]

ALGORITHMS: Mapping[str, tuple[type, int, int]] = {
    # name: (cipher class, key bytes, format version)
    "AES-256-GCM": (AESGCM, 32, fmt.VERSION_GCM),
    "AES-256-SIV": (AESSIV, 64, fmt.VERSION_SIV),
    "HMAC-SHA256": (HmacKey, 32, 0),  # blind indexes: no stored envelope, no version
}
SCOPE_ALGORITHM = {
    kt.SCOPE_TABLE: "AES-256-GCM",
    kt.SCOPE_ROW: "AES-256-GCM",
    kt.SCOPE_DETERMINISTIC: "AES-256-SIV",
    kt.SCOPE_BLIND_INDEX: "HMAC-SHA256",
}
ROW_KEY_WRAPPING = "parent"  # wrapping_key_id of keys wrapped by another key


@dataclass
class _ConnState:
    """What one connection's open transaction knows that others must not.

    ``created``: keys this transaction inserted (not yet known to be stored).
    ``active``: (owner, scope) -> key id chosen for writing in this transaction.
    """

    created: set[int] = field(default_factory=set)
    active: dict[tuple[str, str], int] = field(default_factory=dict)


def kms_context(owner: str, key_id: int) -> dict[str, str]:
    """The encryption context bound to a wrapped key (visible in CloudTrail)."""
    return {"sa_envelope:table": owner, "sa_envelope:key": fmt.format_key_id(key_id)}


class KeyManager:
    """Owns the key table, the plaintext key cache and key creation.

    ``engine`` is the Engine (or AsyncEngine) your sessions use: the manager
    listens to its connections to learn which transaction a value is bound
    in. ``metadata`` lets the key table live in your own MetaData so that
    Alembic autogenerate sees it. No network or database call happens here.
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
    ) -> None:
        self.engine: Engine = getattr(engine, "sync_engine", engine)
        self.provider = provider
        self.table = kt.key_table(metadata if metadata is not None else MetaData(), table_name)
        self._cache = KeyCache(cache or CacheLimits())
        self._active: dict[tuple[str, str], int] = {}  # trusted: read back as stored
        self._lock = threading.RLock()
        self._conn: ContextVar[Connection | None] = ContextVar(f"sa_envelope_conn_{id(self)}", default=None)
        self._state_key = f"sa_envelope_state_{id(self)}"
        self.provider_calls = 0
        self.keys_created = 0
        # Table-key roll-over (docs/rotation.md): encryptions per key, this process.
        self.rollover = rollover if rollover is not None else RolloverPolicy()
        self._max_encryptions = self.rollover.max_encryptions or 0
        self._encryptions: defaultdict[int, itertools.count[int]] = defaultdict(itertools.count)
        self._listen(self.engine)
        _redact.hide_rows(self.engine)  # SQLAlchemy logs rows after decryption

    # -- wiring ---------------------------------------------------------------

    def _listen(self, engine: Engine) -> None:
        """Track the executing connection and the fate of its transaction."""
        event.listen(engine, "before_execute", self._on_execute)
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, "rollback", self._on_rollback)
        event.listen(engine, "rollback_savepoint", self._on_rollback_savepoint)
        event.listen(engine, "reset", self._on_pool_reset)

    def _on_execute(self, conn: Connection, clauseelement: Any, *args: Any) -> None:
        self._conn.set(conn)
        check_statement(clauseelement, *args)  # querying: refuse ORDER BY ciphertext etc.

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

    def _on_pool_reset(self, dbapi_conn: Any, record: Any, reset_state: Any) -> None:
        self._forget(record.info.pop(self._state_key, None))

    def _forget(self, state: _ConnState | None) -> None:
        """Evict keys whose rows were rolled back."""
        if state is not None:
            for key_id in state.created:
                self._cache.evict(key_id)

    @contextlib.contextmanager
    def use_connection(self, conn: Connection) -> Iterator[Connection]:
        """Bind values through ``conn`` (for connections of another engine,
        such as Alembic's): new keys are then written in its transaction."""
        token = self._conn.set(conn)
        try:
            yield conn
        finally:
            self._conn.reset(token)

    # -- public -----------------------------------------------------------------

    def create_table(self) -> None:
        """Create the key table if it does not exist (idempotent)."""
        self.table.create(self.engine, checkfirst=True)

    def stats(self) -> dict[str, int]:
        """Counters: provider calls, cache hits and misses, keys created."""
        return {
            "provider_calls": self.provider_calls,
            "cache_hits": self._cache.hits,
            "cache_misses": self._cache.misses,
            "cache_evictions": self._cache.evictions,
            "cached_keys": len(self._cache),
            "keys_created": self.keys_created,
        }

    def clear_cache(self) -> None:
        """Forget every plaintext key (the next use unwraps again)."""
        with self._lock:
            self._cache.clear()
            self._active.clear()
            rows = self.__dict__.get("_row_keys")  # row scope (issue 3)
            if rows is not None:
                rows.cache.clear()

    # -- the per-value path -------------------------------------------------------

    def encryption_key(self, owner: str, scope: str = kt.SCOPE_TABLE) -> CachedKey:
        """The key new values of ``owner`` are written under."""
        key_id = self._active.get((owner, scope))
        if key_id is not None:
            entry = self._cache.get(key_id)
            if entry is not None:
                if (
                    scope != kt.SCOPE_TABLE
                    or not self._max_encryptions
                    or next(self._encryptions[key_id]) < self._max_encryptions
                ):
                    return entry
                return self._resolve_encryption_key(owner, scope, stale=key_id)  # roll over
        return self._resolve_encryption_key(owner, scope)

    def decryption_key(self, key_id: int, *, table: str, column: str) -> CachedKey:
        """The key a stored value names in its header."""
        entry = self._cache.peek(key_id)
        if entry is not None:
            return entry
        return self._load_key(key_id, table=table, column=column)

    # -- misses -----------------------------------------------------------------

    def _current(self) -> Connection | None:
        conn = self._conn.get()
        if conn is None or conn.closed or conn.invalidated:
            return None
        return conn

    def _state(self, conn: Connection) -> _ConnState:
        state = conn.info.get(self._state_key)
        if state is None:
            state = conn.info[self._state_key] = _ConnState()
        return state

    def _resolve_encryption_key(self, owner: str, scope: str, stale: int | None = None) -> CachedKey:
        conn = self._current()
        if conn is None:
            # Bound outside any tracked execution: make the key durable first,
            # in a transaction of its own, then use it.
            with self.engine.begin() as own:
                with self.use_connection(own):
                    entry = self._resolve_on(own, owner, scope, stale)
            return entry
        return self._resolve_on(conn, owner, scope, stale)

    def _resolve_on(self, conn: Connection, owner: str, scope: str, stale: int | None = None) -> CachedKey:
        """The key to write under. ``stale``: a key past its roll-over limit.

        A miss re-reads the active key (rather than trusting ``_active``), so
        a key rolled over by another process is picked up within one cache
        lifetime.
        """
        state = self._state(conn)
        key_id = state.active.get((owner, scope))
        if key_id is not None and key_id != stale:
            entry = self._cache.get(key_id)
            if entry is not None:
                return entry
            return self._load_key(key_id, table=owner, column=None, conn=conn)
        record = self._db(lambda: kt.find_active(conn, self.table, owner, scope), owner)
        if record is None:
            return self._create_key(conn, state, owner, scope)
        if record.id not in state.created and self._rollover_due(conn, record, stale):
            return self._roll_over(conn, state, owner, scope)
        if record.id in state.created:
            state.active[(owner, scope)] = record.id
        else:
            self._active[(owner, scope)] = record.id  # read back: it is stored
        return self._cache.get(record.id) or self._unwrap_and_cache(record, table=owner, column=None, conn=conn)

    def _create_key(
        self, conn: Connection, state: _ConnState, owner: str, scope: str, *, replacing: bool = False
    ) -> CachedKey:
        """Generate a key and insert it in ``conn``'s transaction (``replacing``:
        a roll-over, which must make a new key even where one is active)."""
        algorithm = SCOPE_ALGORITHM[scope]
        cipher_cls, size, version = ALGORITHMS[algorithm]
        key_id = self._new_key_id(conn, owner, scope, replacing)
        if key_id is None:  # the table's one key of this scope committed since we looked
            return self._adopt_winner(conn, owner, scope, kt.singleton_key_id(owner, scope))
        data_key = self._provider_call(lambda: self.provider.generate(kms_context(owner, key_id), size))
        record = kt.KeyRecord(
            id=key_id,
            scope=scope,
            owner_table=owner,
            parent_id=None,
            wrapping_key_id=data_key.wrapping_key_id,
            wrapped_key=data_key.wrapped,
            algorithm=algorithm,
            status=kt.ACTIVE,
        )
        singleton = key_id == kt.singleton_key_id(owner, scope)
        fault_point("key.create.before_insert")
        inserted = self._db(lambda: kt.insert_record(conn, self.table, record, if_absent=singleton), owner)
        fault_point("key.create.after_insert")
        if not inserted:
            return self._adopt_winner(conn, owner, scope, key_id)
        state.created.add(key_id)
        state.active[(owner, scope)] = key_id
        self.keys_created += 1
        return self._cache.put(key_id, cipher_cls(data_key.plaintext), fmt.header(version, key_id))

    def _adopt_winner(self, conn: Connection, owner: str, scope: str, key_id: int) -> CachedKey:
        """Another transaction committed this table's one key of ``scope``
        while we made ours: use theirs (it is stored, so it is trusted)."""
        record = self._db(lambda: kt.get_record_locked(conn, self.table, key_id), owner)
        if record is None:
            raise EnvelopeError(
                f"the {scope} key of {owner} was created concurrently but cannot be read; retry",
                table=owner, key_id=fmt.format_key_id(key_id),
            )
        self._active[(owner, scope)] = key_id
        return self._unwrap_and_cache(record, table=owner, column=None, conn=conn)

    def _load_key(
        self, key_id: int, *, table: str, column: str | None, conn: Connection | None = None
    ) -> CachedKey:
        if not 0 < key_id < 1 << 63:  # new_key_id() never makes it: a tampered header
            raise KeyNotFoundError(
                table=table, column=column, key_id=fmt.format_key_id(key_id), reason="key id out of range"
            )
        conn = conn or self._current()
        if conn is None:
            with self.engine.connect() as own:
                record = self._db(lambda: kt.get_record(own, self.table, key_id), table)
                return self._checked_unwrap(record, key_id, table, column, own)
        record = self._db(lambda: kt.get_record(conn, self.table, key_id), table)
        return self._checked_unwrap(record, key_id, table, column, conn)

    def _checked_unwrap(
        self, record: kt.KeyRecord | None, key_id: int, table: str, column: str | None, conn: Connection
    ) -> CachedKey:
        if record is None:
            raise KeyNotFoundError(table=table, column=column, key_id=fmt.format_key_id(key_id))
        return self._unwrap_and_cache(record, table=table, column=column, conn=conn)

    def _unwrap_and_cache(
        self, record: kt.KeyRecord, *, table: str, column: str | None, conn: Connection
    ) -> CachedKey:
        if record.wrapped_key is None:
            raise KeyNotFoundError(
                table=table, column=column, key_id=fmt.format_key_id(record.id),
                reason=f"key is {record.status}",
            )
        spec = ALGORITHMS.get(record.algorithm)
        if spec is None or SCOPE_ALGORITHM.get(record.scope) != record.algorithm:
            # a tampered or foreign key row must fail closed, as ours: a 32-byte
            # HMAC key relabelled AES-256-GCM would otherwise load as a cipher
            raise DecryptionError(
                f"key row names algorithm {record.algorithm!r}, which its scope {record.scope!r} does not use",
                table=table, column=column, key_id=fmt.format_key_id(record.id),
            )
        cipher_cls, size, version = spec
        plaintext = self._unwrap(record, table=table, column=column, conn=conn)
        if len(plaintext) != size:
            raise DecryptionError(
                f"unwrapped key does not fit {record.algorithm}",
                table=table, column=column, key_id=fmt.format_key_id(record.id),
            )
        return self._cache.put(record.id, cipher_cls(plaintext), fmt.header(version, record.id))

    def _unwrap(self, record: kt.KeyRecord, *, table: str, column: str | None, conn: Connection) -> bytes:
        """Plaintext of a stored key: by its parent key, or by the provider."""
        assert record.wrapped_key is not None
        if record.parent_id is not None:
            parent = self._cache.peek(record.parent_id) or self._load_parent(record, table, column, conn)
            return self._unwrap_child(parent, record, table=table, column=column)
        context = kms_context(record.owner_table, record.id)
        return self._provider_call(
            lambda: self.provider.unwrap(record.wrapped_key, context, record.wrapping_key_id)  # type: ignore[arg-type]
        )

    def _load_parent(self, record: kt.KeyRecord, table: str, column: str | None, conn: Connection) -> CachedKey:
        """A child key's parent, which the provider must wrap: one level only,
        so a key table edited into a chain or a cycle of parents fails closed
        instead of recursing (tampering, issue 7)."""
        parent_id = record.parent_id
        assert parent_id is not None
        parent = self._db(lambda: kt.get_record(conn, self.table, parent_id), table)
        if parent is not None and parent.parent_id is not None:
            raise DecryptionError(
                f"key row names parent {fmt.format_key_id(parent_id)}, which is not wrapped by the provider",
                table=table, column=column, key_id=fmt.format_key_id(record.id),
            )
        return self._checked_unwrap(parent, parent_id, table, column, conn)

    def _unwrap_child(self, parent: CachedKey, record: kt.KeyRecord, *, table: str, column: str | None) -> bytes:
        """Row keys are wrapped locally by their table key (see _rowkeys)."""
        from ._rowkeys import unwrap_row_key

        return unwrap_row_key(parent, record, table=table, column=column)

    # -- helpers ------------------------------------------------------------------

    def _provider_call(self, fn: Any) -> Any:
        self.provider_calls += 1
        return run_blocking(fn)  # off the event loop under asyncio (see _async)

    def _db(self, fn: Any, owner: str) -> Any:
        """Run a key-table query; a database failure becomes ours, named."""
        try:
            return fn()
        except EnvelopeError:
            raise
        except SQLAlchemyError as exc:
            raise EnvelopeError(
                f"key table {self.table.name} query failed for table {owner}: {type(exc).__name__}",
                table=owner,
            ) from exc

    def __repr__(self) -> str:
        return f"KeyManager(table={self.table.name!r}, provider={self.provider!r})"

    # -- rotation: rewrap, table-key roll-over, re-encryption (docs/rotation.md) ---

    def _rollover_due(self, conn: Connection, record: kt.KeyRecord, stale: int | None) -> bool:
        """Whether the active key just read must be replaced before writing."""
        if record.scope != kt.SCOPE_TABLE:
            return False  # deterministic keys never roll over (equality queries)
        if record.id == stale:
            return True
        if self.rollover.max_age is None:
            return False
        from ._rollover import created_at

        return self.rollover.too_old(self._db(lambda: created_at(conn, self.table, record.id), record.owner_table))

    def _roll_over(self, conn: Connection, state: _ConnState, owner: str, scope: str) -> CachedKey:
        """A new active key in ``conn``'s transaction; the others become retired.

        Both writes share the writer's transaction, so a rollback undoes the
        roll-over as a whole and the old key stays active.
        """
        from ._rollover import retire_others

        entry = self._create_key(conn, state, owner, scope, replacing=True)
        fault_point("rollover.before_retire")
        self._db(lambda: retire_others(conn, self.table, owner, scope, entry.key_id), owner)
        fault_point("rollover.after_retire")
        with self._lock:
            self._active.pop((owner, scope), None)
        return entry

    def rotate_table_key(self, table: str) -> int:
        """Make a new active key for ``table`` now; older keys stay for reading.

        Runs in a transaction of its own and returns the new key id. No value
        is re-encrypted (see :meth:`reencrypt` for that).
        """
        return self._rotate(table, kt.SCOPE_TABLE)

    def _rotate(self, owner: str, scope: str) -> int:
        from ._rollover import lock_active

        with self.engine.begin() as conn, self.use_connection(conn):
            self._db(lambda: lock_active(conn, self.table, owner, scope), owner)
            new_id = self._roll_over(conn, self._state(conn), owner, scope).key_id
        with self.engine.connect() as conn:  # read back: only a stored key is trusted
            record = self._db(lambda: kt.find_active(conn, self.table, owner, scope), owner)
        if record is not None:
            with self._lock:
                self._active[(owner, scope)] = record.id
        return new_id

    def rewrap(
        self,
        to: KeyProvider | None = None,
        *,
        source: KeyProvider | None = None,
        batch_size: int = 100,
        progress: bool | None = None,
    ) -> Any:
        """Re-wrap every provider-wrapped key under ``to`` (default: ``self.provider``).

        ``source`` unwraps keys where ``to`` cannot move them itself (KMS
        ``ReEncrypt`` needs none); it defaults to the current provider. Once
        every key is moved, ``self.provider`` becomes ``to``, so new keys are
        wrapped by it too. Returns a :class:`~sa_envelope.RewrapReport`.
        """
        from ._rewrap import rewrap_keys

        target = to if to is not None else self.provider
        report = rewrap_keys(
            self.engine, self.table, source or self.provider, target,
            batch_size=batch_size, progress=progress,
        )
        if report.complete:
            self.provider = target
        return report

    def reencrypt(
        self,
        columns: Any,
        *,
        key_id: int | str,
        batch_size: int = 500,
        progress: bool | None = None,
    ) -> Any:
        """Re-encrypt the values of ``columns`` stored under ``key_id`` with the
        active key (rolled over first if ``key_id`` is still active).

        ``columns`` are table columns declared with ``EncryptedType``. Returns
        a :class:`~sa_envelope.ReencryptReport`; once it shows nothing left,
        the old key encrypts nothing any more and may be shredded.
        """
        from ._reencrypt import reencrypt_columns

        return reencrypt_columns(self, list(columns), key_id=key_id, batch_size=batch_size, progress=progress)

    # -- querying & asyncio (see _async) ------------------------------------------------

    def _new_key_id(self, conn: Connection, owner: str, scope: str, replacing: bool = False) -> int | None:
        """A fixed id for the first deterministic / blind-index key of a table
        (concurrent creators collide instead of splitting the column in two),
        a random one otherwise (see ``kt.singleton_key_id``).

        ``None``: that first key is stored and active although the caller's
        ``find_active`` saw none, because a concurrent writer committed it in
        between (READ COMMITTED sees it now): the caller adopts it. Making a
        random-id key here instead gave PostgreSQL two deterministic keys.
        """
        if scope in kt.SINGLETON_SCOPES:
            key_id = kt.singleton_key_id(owner, scope)
            record = self._db(lambda: kt.get_record(conn, self.table, key_id), owner)
            if record is None:
                return key_id
            if record.status == kt.ACTIVE and not replacing:
                return None
        return kt.new_key_id()

    def warm(self, tables: Iterable[Any] | None = None) -> int:
        """Load the keys of ``tables`` (names or Table objects; default all)
        into the cache now, so that first requests make no provider call."""
        return _async.warm(self, tables)

    async def warm_async(self, tables: Iterable[Any] | None = None) -> int:
        """:meth:`warm` for asyncio; provider calls run in worker threads."""
        return await _async.warm_async(self, tables)

    async def create_table_async(self) -> None:
        """:meth:`create_table` for a KeyManager built on an AsyncEngine."""
        await _async.create_table_async(self)

    # -- row scope and crypto-shredding (issue 3: _rowkeys, _roworm, _rowprefetch) --

    @property
    def rows(self) -> Any:
        """The row keys of this manager (see _rowkeys). Created with the first
        row-scoped column, which also installs the ORM hooks and the read prefetch."""
        rows = self.__dict__.get("_row_keys")
        if rows is None:
            with self._lock:
                rows = self.__dict__.get("_row_keys")
                if rows is None:
                    from ._rowkeys import RowKeys
                    from ._roworm import install_orm_hooks
                    from ._rowprefetch import install_prefetch

                    rows = RowKeys(self)
                    install_prefetch(rows)
                    install_orm_hooks()
                    self.__dict__["_row_keys"] = rows
        return rows

    def new_row_keys(self, conn: Connection, table: str, count: int) -> list[Any]:
        """``count`` new row keys for ``table``, inserted on ``conn`` (Core API):
        ``conn.execute(insert(t), [{"notes": k.value(v)} for k, v in zip(keys, values)])``."""
        from ._rowkeys import RowKey

        return [RowKey(k, table) for k in self.rows.create(conn, table, count)]

    def new_row_key(self, conn: Connection, table: str) -> Any:
        """One new row key for a row of ``table``, inserted on ``conn``."""
        return self.new_row_keys(conn, table, 1)[0]

    def shred(self, instance: Any) -> list[str]:
        """Crypto-shred an ORM instance's row: destroy its row key in the
        session's transaction (commit to make it final). Its row-scoped
        attributes then load as ``None``. Returns the shredded key ids."""
        from ._roworm import shred_instance

        return [fmt.format_key_id(k) for k in shred_instance(self, instance)]

    def shred_key(self, key_id: int | str, conn: Connection | None = None) -> None:
        """Destroy one row key's material, on ``conn`` (the caller's
        transaction) or, without it, in a transaction of its own."""
        kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
        if conn is not None:
            self.rows.shred_key(conn, kid)
            return
        with self.engine.begin() as own:
            self.rows.shred_key(own, kid)
