"""The key store: find, create, adopt, unwrap and roll over data keys.

The one rule everything here serves: **no value is ever written under a key
that is not durably stored.** A new table key is inserted on the same
connection, in the same transaction, as the first value that uses it, so the
key and its values commit or roll back together (and SQLite's single writer
is never asked for a second connection). Which transaction made which key is
the :class:`~.tracking.Tracker`'s business; a key is trusted process-wide
(``_active``) only once read back from the key table by a transaction that
did not create it.

The per-value path (:meth:`encryption_key`, :meth:`decryption_key`, which the
column types call directly) is two dict lookups once a key is cached.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, TypeVar

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import SQLAlchemyError

from ..envelope import ciphers
from ..envelope import format as fmt
from ..errors import DecryptionError, EnvelopeError, KeyNotFoundError, UnauthenticatedKeyError, UntrustedKeyError
from ..faults import fault_point
from ..providers.base import CONTEXT_VERSION, Context, KeyProvider, key_context
from . import choice
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
        namespace: str | None = None,
    ) -> None:
        self.engine = engine
        self.namespace = namespace  # bound into every new key's context
        self.provider = provider
        self.table = table
        self.cache = cache
        self.tracker = tracker
        self.rollover = rollover
        self._active: dict[tuple[str, str], int] = {}  # trusted: read back as stored
        self._lock = threading.RLock()
        self.provider_calls = 0
        self.keys_created = 0
        self.budget = ro.EncryptionBudget(rollover.max_encryptions)  # roll-over by encryptions
        self.on_rollover: list[Callable[[Connection, str, CachedKey], None]] = []

    # -- the per-value path ----------------------------------------------------------

    def encryption_key(self, owner: str, scope: str = kt.SCOPE_TABLE, uses: int = 1) -> CachedKey:
        """The key new values of ``owner`` are written under, counting ``uses``
        AES-GCM encryptions toward the roll-over limit (row keys wrapped
        under a table key count too: ``uses`` is how many)."""
        key_id = self._active.get((owner, scope))
        if key_id is not None and uses == 1:
            entry = self.cache.get(key_id)
            if entry is not None:
                budget = self.budget
                if scope != kt.SCOPE_TABLE or not budget.limit or next(budget.counts[key_id]) < budget.limit:
                    return entry
                return self._counted(owner, scope, uses, stale=key_id)  # roll over
        return self._counted(owner, scope, uses)

    def _counted(self, owner: str, scope: str, uses: int, stale: int | None = None) -> CachedKey:
        """The write key, with ``uses`` counted on it; one whose budget runs
        out is rolled over (also inside the transaction that made it)."""
        while True:
            entry = self._resolve_encryption_key(owner, scope, stale)
            if scope != kt.SCOPE_TABLE or self.budget.take(entry.key_id, uses):
                return entry
            stale = entry.key_id

    def decryption_key(self, key_id: int, *, table: str, column: str) -> CachedKey:
        """The key a stored value names in its header."""
        entry = self.cache.peek(key_id)
        if entry is not None:
            return entry
        return self._load_key(key_id, table=table, column=column)

    def trust(self, owner: str, scope: str, key_id: int) -> None:
        """Make ``key_id`` the write key of (owner, scope): it was read committed."""
        with self._lock:
            self._active[(owner, scope)] = key_id

    def clear(self) -> None:
        """Forget every plaintext key and every write-key choice."""
        with self._lock:
            self.cache.clear()
            self._active.clear()

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

        A miss re-reads the key table (rather than trusting ``_active``), so
        a key rolled over by another process is picked up within one cache
        lifetime; what it may pick is :mod:`.choice`'s rule.
        """
        state = self.tracker.state(conn)
        key_id = state.active.get((owner, scope))
        if key_id is not None and key_id != stale:
            entry = self.cache.get(key_id)
            if entry is not None:
                return entry
            return self._load_key(key_id, table=owner, column=None, conn=conn)
        found = self.current(conn, owner, scope)
        if found is None:  # a table key replacing refused active rows retires them, as a roll-over
            if scope == kt.SCOPE_TABLE and self.query(lambda: kt.find_active(conn, self.table, owner, scope), owner):
                return self._roll_over(conn, state, owner, scope)
            return self._create_key(conn, state, owner, scope)
        record, entry = found
        if self._rollover_due(conn, record, stale):
            return self._roll_over(conn, state, owner, scope)
        if record.id in state.created:
            state.active[(owner, scope)] = record.id
        else:
            self._active[(owner, scope)] = record.id  # read back: it is stored
        return entry

    def current(self, conn: Connection, owner: str, scope: str) -> tuple[kt.KeyRecord, CachedKey] | None:
        """The current key of (owner, scope) as ``conn`` sees the key table:
        the newest active row that may be a write key, whose metadata
        authenticates and which has no authenticated successor (a key dated
        later, whatever its status: un-retiring a key does not revive it).
        ``None``: there is none, and a new key is to be made."""
        now, successor = kt.utcnow(), -1
        for record in self.query(lambda: kt.find_candidates(conn, self.table, owner, scope, choice.CANDIDATES), owner):
            entry = self.usable(record, conn, now)
            if entry is None:
                continue
            created = kt.created_seconds(record.created_at)
            if record.status != kt.ACTIVE:
                successor = max(successor, created)
            elif created >= successor:
                return record, entry
            else:
                return None
        return None

    def usable(self, record: kt.KeyRecord, conn: Connection, now: Any) -> CachedKey | None:
        """The unwrapped key of a candidate row, or ``None`` where the row is
        refused (untrusted, future, unauthenticated: ``verify`` reports it)."""
        if choice.refusal(record, self.provider, now) is not None:
            return None
        entry = self.cache.get(record.id)
        if entry is not None and entry.owner == record.owner_table and entry.scope == record.scope:
            return entry
        try:
            return self.unwrap_record(record, table=record.owner_table, column=None, conn=conn)
        except (UntrustedKeyError, UnauthenticatedKeyError, DecryptionError):
            return None

    def _create_key(
        self, conn: Connection, state: TxState, owner: str, scope: str, *, replacing: bool = False
    ) -> CachedKey:
        """Generate a key and insert it in ``conn``'s transaction (``replacing``:
        a roll-over, which must make a new key even where one is current)."""
        algorithm = kt.SCOPE_ALGORITHM[scope]
        cipher_cls, size, version = ciphers.ALGORITHMS[algorithm]
        key_id = self._new_key_id(conn, owner, scope, replacing)
        if isinstance(key_id, CachedKey):  # the table's one key of this scope committed since we looked
            return key_id
        created = kt.utcnow().replace(microsecond=0)  # whole seconds: what every backend stores
        if replacing:  # a successor is dated strictly later than what it replaces
            created = self.query(lambda: ro.successor_time(conn, self.table, owner, scope, created), owner)
        record = kt.KeyRecord.unwrapped(key_id, scope, owner, algorithm, created, CONTEXT_VERSION)
        data_key = self._provider_call(lambda: self.provider.generate(self.context_of(record), size))
        record = dataclasses.replace(record, wrapping_key_id=data_key.wrapping_key_id, wrapped_key=data_key.wrapped)
        singleton = key_id == kt.singleton_key_id(owner, scope)
        fault_point("key.create.before_insert")
        inserted = self.query(lambda: kt.insert_record(conn, self.table, record, if_absent=singleton), owner)
        fault_point("key.create.after_insert")
        if not inserted:
            return self._adopt_winner(conn, owner, scope, key_id)
        state.created.add(key_id)
        state.active[(owner, scope)] = key_id
        self.keys_created += 1
        return self.cache.put(key_id, cipher_cls(data_key.plaintext), fmt.header(version, key_id), owner, scope)

    def _new_key_id(self, conn: Connection, owner: str, scope: str, replacing: bool = False) -> int | CachedKey:
        """A fixed id for the first deterministic / blind-index key of a table
        (concurrent creators collide instead of splitting the column in two),
        a random one otherwise (see ``kt.singleton_key_id``).

        A row already at the fixed id is a concurrent writer's first key,
        committed since the caller looked (READ COMMITTED sees it now: it is
        returned, adopted); or a row wrapped by a CMK we do not trust, which
        a database writer can plant there before the table's first write (the
        id is predictable): a random id then. Any other row there (ours, but
        tampered) fails closed: a second key would split equality queries.
        """
        if scope in kt.SINGLETON_SCOPES and not replacing:
            key_id = kt.singleton_key_id(owner, scope)
            existing = self._get(conn, key_id, owner)
            if existing is None:
                return key_id
            found = self.current(conn, owner, scope)
            if found is not None:
                self._active[(owner, scope)] = found[0].id
                return found[1]
            if self.provider.trusts(existing.wrapping_key_id):
                self.unwrap_record(existing, table=owner, column=None, conn=conn)  # raises the reason
                raise EnvelopeError(
                    f"the {scope} key of {owner} cannot be a write key (see verify)",
                    table=owner,
                    key_id=fmt.format_key_id(key_id),
                )
        return fmt.new_key_id()

    def _adopt_winner(self, conn: Connection, owner: str, scope: str, key_id: int) -> CachedKey:
        """Another transaction committed this table's one key of ``scope``
        while we made ours: use theirs if it may be a write key (it is stored)."""
        record = self.query(lambda: kt.get_record_locked(conn, self.table, key_id), owner)
        entry = None
        if record is not None and (record.owner_table, record.scope) == (owner, scope):
            entry = self.usable(record, conn, kt.utcnow())
        if entry is None:
            raise EnvelopeError(
                f"the {scope} key of {owner} was created concurrently but cannot be used; retry",
                table=owner,
                key_id=fmt.format_key_id(key_id),
            )
        self._active[(owner, scope)] = key_id
        return entry

    def _load_key(self, key_id: int, *, table: str, column: str | None, conn: Connection | None = None) -> CachedKey:
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
        where = {"table": table, "column": column, "key_id": fmt.format_key_id(record.id)}
        if record.wrapped_key is None:
            raise KeyNotFoundError(**where, reason=f"key is {record.status}")
        spec = ciphers.ALGORITHMS.get(record.algorithm)
        if spec is None or kt.SCOPE_ALGORITHM.get(record.scope) != record.algorithm:
            # a tampered or foreign key row must fail closed, as ours: a 32-byte
            # HMAC key relabelled AES-256-GCM would otherwise load as a cipher
            raise DecryptionError(f"key row names algorithm {record.algorithm!r}, not its scope's", **where)
        cipher_cls, size, version = spec
        plaintext = self._unwrap(record, table=table, column=column, conn=conn)
        if len(plaintext) != size:
            raise DecryptionError(f"unwrapped key does not fit {record.algorithm}", **where)
        head = fmt.header(version, record.id)
        return self.cache.put(record.id, cipher_cls(plaintext), head, record.owner_table, record.scope)

    def _unwrap(self, record: kt.KeyRecord, *, table: str, column: str | None, conn: Connection) -> bytes:
        """Plaintext of a stored key: by its parent key, or by the provider."""
        wrapped = record.wrapped_key
        assert wrapped is not None
        if record.parent_id is not None:
            parent = self.cache.peek(record.parent_id) or self._load_parent(record, table, column, conn)
            return self.open_child(
                parent, record.id, record.parent_id, record.owner_table, wrapped, table, column, record.row_digest
            )
        context = self.context_of(record)
        self.provider.require_trusted(record.wrapping_key_id, context)  # before any KMS call
        return self._provider_call(lambda: self.provider.unwrap(wrapped, context, record.wrapping_key_id))

    def context_of(self, record: kt.KeyRecord) -> Context:
        """The provider context a key row states (its own context version)."""
        return key_context(choice.key_meta(record, self.namespace))

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
                table=table,
                column=column,
                key_id=fmt.format_key_id(record.id),
            )
        return self._checked_unwrap(parent, parent_id, table, column, conn)

    @staticmethod
    def open_child(
        parent: CachedKey,
        key_id: int,
        parent_id: int,
        owner: str,
        wrapped: Any,
        table: str,
        column: str | None,
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
        for follow in self.on_rollover:  # keys wrapped by the table key follow it (rows.binding)
            follow(conn, owner, entry)
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
            found = self.current(conn, owner, scope)
        if found is not None:
            self.trust(owner, scope, found[0].id)
        return new_id

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
                f"key table {self.table.name} query failed for table {owner}: {type(exc).__name__}", table=owner
            ) from exc
