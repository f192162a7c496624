"""The key store: find, create, adopt, unwrap and roll over data keys.

The one rule everything here serves: **no value is ever written under a key
that is not durably stored.** A new table key is inserted on the same
connection, in the same transaction, as the first value that uses it, so the
key and its values commit or roll back together (and SQLite's single writer
is never asked for a second connection). Which transaction made which key is
the :class:`~.tracking.Tracker`'s business; a key is trusted process-wide
(``_active``) only once read back from the key table by a transaction that
did not create it.

The per-value path (:meth:`KeyStore.encryption_key`,
:meth:`KeyStore.decryption_key`) is two dict lookups once a key is cached;
only a miss does I/O. The manager binds these two methods straight into the
column types' processors: no facade layer in between.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from typing import Any, Callable, TypeVar

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import SQLAlchemyError

from ..envelope import ciphers
from ..envelope import format as fmt
from ..errors import DecryptionError, EnvelopeError, KeyNotFoundError
from ..faults import fault_point
from ..providers.base import KeyProvider, key_context
from . import rollover as ro
from . import table as kt
from .cache import CachedKey, KeyCache
from .offload import run_blocking
from .tracking import Tracker, TxState

__all__ = ["KeyStore"]

T = TypeVar("T")


class KeyStore:
    """Table-level keys (table, deterministic, blind-index) of one key table."""

    def __init__(
        self,
        engine: Engine,
        provider: KeyProvider,
        table: Table,
        cache: KeyCache,
        tracker: Tracker,
        rollover: ro.RolloverPolicy,
    ) -> None:
        self.engine = engine
        self.provider = provider
        self.table = table
        self.cache = cache
        self.tracker = tracker
        self.rollover = rollover
        self._active: dict[tuple[str, str], int] = {}  # trusted: read back as stored
        self._lock = threading.RLock()
        self.provider_calls = 0
        self.keys_created = 0
        # Table-key roll-over (docs/rotation.md): encryptions per key, this process.
        self._max_encryptions = rollover.max_encryptions or 0
        self._encryptions: defaultdict[int, itertools.count[int]] = defaultdict(itertools.count)

    # -- the per-value path ----------------------------------------------------------

    def encryption_key(self, owner: str, scope: str = kt.SCOPE_TABLE) -> CachedKey:
        """The key new values of ``owner`` are written under."""
        key_id = self._active.get((owner, scope))
        if key_id is not None:
            entry = self.cache.get(key_id)
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
        entry = self.cache.peek(key_id)
        if entry is not None:
            return entry
        return self._load_key(key_id, table=table, column=column)

    # -- trust -------------------------------------------------------------------------

    def trust(self, owner: str, scope: str, key_id: int) -> None:
        """Make ``key_id`` the write key of (owner, scope): it was read committed."""
        with self._lock:
            self._active[(owner, scope)] = key_id

    def clear(self) -> None:
        """Forget every plaintext key and every write-key choice."""
        with self._lock:
            self.cache.clear()
            self._active.clear()

    # -- misses ------------------------------------------------------------------------

    def _resolve_encryption_key(self, owner: str, scope: str, stale: int | None = None) -> CachedKey:
        conn = self.tracker.current()
        if conn is None:
            # Bound outside any tracked execution: make the key durable first,
            # in a transaction of its own, then use it.
            with self.engine.begin() as own, self.tracker.use_connection(own):
                return self._resolve_on(own, owner, scope, stale)
        return self._resolve_on(conn, owner, scope, stale)

    def _resolve_on(self, conn: Connection, owner: str, scope: str, stale: int | None = None) -> CachedKey:
        """The key to write under. ``stale``: a key past its roll-over limit.

        A miss re-reads the active key (rather than trusting ``_active``), so
        a key rolled over by another process is picked up within one cache
        lifetime.
        """
        state = self.tracker.state(conn)
        key_id = state.active.get((owner, scope))
        if key_id is not None and key_id != stale:
            entry = self.cache.get(key_id)
            if entry is not None:
                return entry
            return self._load_key(key_id, table=owner, column=None, conn=conn)
        record = self.query(lambda: kt.find_active(conn, self.table, owner, scope), owner)
        if record is None:
            return self._create_key(conn, state, owner, scope)
        if record.id not in state.created and self._rollover_due(conn, record, stale):
            return self._roll_over(conn, state, owner, scope)
        if record.id in state.created:
            state.active[(owner, scope)] = record.id
        else:
            self._active[(owner, scope)] = record.id  # read back: it is stored
        return self.cache.get(record.id) or self.unwrap_record(record, table=owner, column=None, conn=conn)

    def _create_key(
        self, conn: Connection, state: TxState, owner: str, scope: str, *, replacing: bool = False
    ) -> CachedKey:
        """Generate a key and insert it in ``conn``'s transaction (``replacing``:
        a roll-over, which must make a new key even where one is active)."""
        algorithm = kt.SCOPE_ALGORITHM[scope]
        cipher_cls, size, version = ciphers.ALGORITHMS[algorithm]
        key_id = self._new_key_id(conn, owner, scope, replacing)
        if key_id is None:  # the table's one key of this scope committed since we looked
            return self._adopt_winner(conn, owner, scope, kt.singleton_key_id(owner, scope))
        context = key_context(owner, fmt.format_key_id(key_id))
        data_key = self._provider_call(lambda: self.provider.generate(context, size))
        record = kt.KeyRecord(
            id=key_id, scope=scope, owner_table=owner, parent_id=None,
            wrapping_key_id=data_key.wrapping_key_id, wrapped_key=data_key.wrapped,
            algorithm=algorithm, status=kt.ACTIVE,
        )
        singleton = key_id == kt.singleton_key_id(owner, scope)
        fault_point("key.create.before_insert")
        inserted = self.query(lambda: kt.insert_record(conn, self.table, record, if_absent=singleton), owner)
        fault_point("key.create.after_insert")
        if not inserted:
            return self._adopt_winner(conn, owner, scope, key_id)
        state.created.add(key_id)
        state.active[(owner, scope)] = key_id
        self.keys_created += 1
        return self.cache.put(key_id, cipher_cls(data_key.plaintext), fmt.header(version, key_id))

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
            record = self.query(lambda: kt.get_record(conn, self.table, key_id), owner)
            if record is None:
                return key_id
            if record.status == kt.ACTIVE and not replacing:
                return None
        return fmt.new_key_id()

    def _adopt_winner(self, conn: Connection, owner: str, scope: str, key_id: int) -> CachedKey:
        """Another transaction committed this table's one key of ``scope``
        while we made ours: use theirs (it is stored, so it is trusted)."""
        record = self.query(lambda: kt.get_record_locked(conn, self.table, key_id), owner)
        if record is None:
            raise EnvelopeError(
                f"the {scope} key of {owner} was created concurrently but cannot be read; retry",
                table=owner, key_id=fmt.format_key_id(key_id),
            )
        self._active[(owner, scope)] = key_id
        return self.unwrap_record(record, table=owner, column=None, conn=conn)

    def _load_key(
        self, key_id: int, *, table: str, column: str | None, conn: Connection | None = None
    ) -> CachedKey:
        if not fmt.is_key_id(key_id):  # never made: a tampered header
            raise KeyNotFoundError(
                table=table, column=column, key_id=fmt.format_key_id(key_id), reason="key id out of range"
            )
        conn = conn or self.tracker.current()
        if conn is None:
            with self.engine.connect() as own:
                return self._checked_unwrap(self._get(own, key_id, table), key_id, table, column, own)
        return self._checked_unwrap(self._get(conn, key_id, table), key_id, table, column, conn)

    def _get(self, conn: Connection, key_id: int, owner: str) -> kt.KeyRecord | None:
        return self.query(lambda: kt.get_record(conn, self.table, key_id), owner)

    def _checked_unwrap(
        self, record: kt.KeyRecord | None, key_id: int, table: str, column: str | None, conn: Connection
    ) -> CachedKey:
        if record is None:
            raise KeyNotFoundError(table=table, column=column, key_id=fmt.format_key_id(key_id))
        return self.unwrap_record(record, table=table, column=column, conn=conn)

    # -- unwrapping --------------------------------------------------------------------

    def unwrap_record(self, record: kt.KeyRecord, *, table: str, column: str | None, conn: Connection) -> CachedKey:
        """Unwrap a key row (checking that it fits its scope) and cache it."""
        shown = fmt.format_key_id(record.id)
        if record.wrapped_key is None:
            raise KeyNotFoundError(table=table, column=column, key_id=shown, reason=f"key is {record.status}")
        spec = ciphers.ALGORITHMS.get(record.algorithm)
        if spec is None or kt.SCOPE_ALGORITHM.get(record.scope) != record.algorithm:
            # a tampered or foreign key row must fail closed, as ours: a 32-byte
            # HMAC key relabelled AES-256-GCM would otherwise load as a cipher
            raise DecryptionError(
                f"key row names algorithm {record.algorithm!r}, which its scope {record.scope!r} does not use",
                table=table, column=column, key_id=shown,
            )
        cipher_cls, size, version = spec
        plaintext = self._unwrap(record, table=table, column=column, conn=conn)
        if len(plaintext) != size:
            raise DecryptionError(f"unwrapped key does not fit {record.algorithm}", table=table, column=column, key_id=shown)
        return self.cache.put(record.id, cipher_cls(plaintext), fmt.header(version, record.id))

    def _unwrap(self, record: kt.KeyRecord, *, table: str, column: str | None, conn: Connection) -> bytes:
        """Plaintext of a stored key: by its parent key, or by the provider."""
        wrapped = record.wrapped_key
        assert wrapped is not None
        if record.parent_id is not None:
            parent = self.cache.peek(record.parent_id) or self._load_parent(record, table, column, conn)
            return self.open_child(
                parent, record.id, record.parent_id, record.owner_table, wrapped, table, column, record.row_digest
            )
        context = key_context(record.owner_table, fmt.format_key_id(record.id))
        return self._provider_call(lambda: self.provider.unwrap(wrapped, context, record.wrapping_key_id))

    def _load_parent(self, record: kt.KeyRecord, table: str, column: str | None, conn: Connection) -> CachedKey:
        """A child key's parent, which the provider must wrap: one level only,
        so a key table edited into a chain or a cycle of parents fails closed
        instead of recursing."""
        parent_id = record.parent_id
        assert parent_id is not None
        parent = self._get(conn, parent_id, table)
        if parent is not None and parent.parent_id is not None:
            raise DecryptionError(
                f"key row names parent {fmt.format_key_id(parent_id)}, which is not wrapped by the provider",
                table=table, column=column, key_id=fmt.format_key_id(record.id),
            )
        return self._checked_unwrap(parent, parent_id, table, column, conn)

    @staticmethod
    def open_child(
        parent: CachedKey, key_id: int, parent_id: int, owner: str, wrapped: Any, table: str, column: str | None,
        digest: bytes | None = None,
    ) -> bytes:
        """A row key's plaintext, unwrapped locally by its table key (``digest``:
        the key row's ``row_digest``, for a key bound to its row)."""
        try:
            return ciphers.open_row_key(parent.cipher, parent.head[0], key_id, parent_id, owner, wrapped, digest)
        except fmt.InvalidEnvelope as exc:
            raise DecryptionError(str(exc), table=table, column=column, key_id=fmt.format_key_id(key_id)) from None

    # -- roll-over and rotation (docs/rotation.md) ---------------------------------------

    def _rollover_due(self, conn: Connection, record: kt.KeyRecord, stale: int | None) -> bool:
        """Whether the active key just read must be replaced before writing."""
        if record.scope != kt.SCOPE_TABLE:
            return False  # deterministic keys never roll over (equality queries)
        if record.id == stale:
            return True
        if self.rollover.max_age is None:
            return False
        created = self.query(lambda: ro.created_at(conn, self.table, record.id), record.owner_table)
        return self.rollover.too_old(created)

    def _roll_over(self, conn: Connection, state: TxState, owner: str, scope: str) -> CachedKey:
        """A new active key in ``conn``'s transaction; the others become retired.

        Both writes share the writer's transaction, so a rollback undoes the
        roll-over as a whole and the old key stays active.
        """
        entry = self._create_key(conn, state, owner, scope, replacing=True)
        fault_point("rollover.before_retire")
        self.query(lambda: ro.retire_others(conn, self.table, owner, scope, entry.key_id), owner)
        fault_point("rollover.after_retire")
        with self._lock:
            self._active.pop((owner, scope), None)
        return entry

    def rotate(self, owner: str, scope: str = kt.SCOPE_TABLE) -> int:
        """Make a new active key of ``scope`` for ``owner`` now, in a transaction
        of its own; older keys stay for reading. Returns the new key id."""
        with self.engine.begin() as conn, self.tracker.use_connection(conn):
            self.query(lambda: ro.lock_active(conn, self.table, owner, scope), owner)
            new_id = self._roll_over(conn, self.tracker.state(conn), owner, scope).key_id
        with self.engine.connect() as conn:  # read back: only a stored key is trusted
            record = self.query(lambda: kt.find_active(conn, self.table, owner, scope), owner)
        if record is not None:
            self.trust(owner, scope, record.id)
        return new_id

    # -- helpers -----------------------------------------------------------------------

    def _provider_call(self, fn: Callable[[], T]) -> T:
        self.provider_calls += 1
        return run_blocking(fn)  # off the event loop under asyncio (see offload)

    def query(self, fn: Callable[[], T], owner: str) -> T:
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
