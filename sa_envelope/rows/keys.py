"""Row keys: one data key per row, wrapped locally by its table key.

Why a key per row: shredding. Destroy one row's key and that row's
row-scoped values are unreadable wherever they were copied (replicas, exports,
backups), while every other row still reads. Only table keys are wrapped by
the KMS; a row key is ``os.urandom(32)`` wrapped with AES-256-GCM under its
table key, with associated data binding the row key id, the table key id and
the owner table, and the row's digest (``envelope.ciphers``, which owns the wrap format). Creating or unwrapping a row key is
therefore a local AES call, never a provider call: 20,000 new rows cost the
one ``GenerateDataKey`` (or ``Decrypt``) of their table key.

Stored wrapped form: see :mod:`sa_envelope.envelope.ciphers` and docs/format.md
(column ``wrapped_key``, ``wrapping_key_id = "parent"``).

**Where a row's key comes from.** Every value names its key in its header,
and a row key's key row records the keyed digest of the row it is bound to
(:mod:`.binding`): writing a row's values uses the key bound to that row,
never the key some stored value names. Writing goes through :class:`~sa_envelope.columns.rowvalue.RowValue`:
a value paired with the row key it must be sealed under. The ORM hooks
(:mod:`.orm`) build those pairs; a bare value reaching a row-scoped column
raises :class:`~sa_envelope.RowKeyRequiredError`, so nothing is ever sealed
under a key that was not inserted in the same transaction.

**Caching.** Row keys live in their own :class:`KeyCache`, much larger than
the table-key cache (20,000 rows would thrash 1,000 slots), with the same age
and use limits: a row key is only as fresh as the table key that unwraps it.
A shredded key is cached as a tombstone (cipher ``None``) once *read* from the
key table, so a shred done by another process is honoured as soon as this
process reloads the key, and at the latest after ``CacheLimits.max_age``.
Keys inserted, and keys shredded, by a transaction that rolls back are
evicted with it (a tombstone read inside a rolled-back shred must not stay):
the :class:`~sa_envelope.keys.tracking.Tracker` does that for this cache too.

**Reading without a query per row.** :mod:`.prefetch` looks at every SELECT
that returns row-scoped columns of this manager, collects the key ids from the
value headers and loads the missing keys with a few ``IN`` queries before the
rows are processed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, TypeVar

from sqlalchemy import Connection, Table, any_, bindparam, select, update
from sqlalchemy.engine.cursor import _DEFAULT_FETCH

from ..envelope import ciphers
from ..envelope import format as fmt
from ..errors import ConfigurationError, DecryptionError, KeyNotFoundError
from ..faults import fault_point
from ..keys import table as kt
from ..keys.cache import CacheLimits, CachedKey, KeyCache
from ..keys.store import KeyStore
from . import binding, keyrows, pgarrays
from .keyrows import IN_CHUNK

__all__ = ["ROW_CACHE_SIZE", "RowKeys"]

T = TypeVar("T")
ROW_CACHE_SIZE = 65_536


class RowKeys:
    """A KeyManager's row keys: creation, loading, cache, shredding."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.tracker = store.tracker
        self.table: Table = store.table
        limits: CacheLimits = store.cache.limits
        self.cache = KeyCache(CacheLimits(max(ROW_CACHE_SIZE, limits.max_size), limits.max_age, limits.max_uses))
        self.tracker.row_cache = self.cache  # evicted with the transactions that made them
        self.keys_created = 0
        self._statements: dict[tuple[bool, bool], Any] = {}  # the key-row query: (PostgreSQL?, psycopg?)
        self.key_queries = 0
        store.on_rollover.append(lambda conn, owner, parent: binding.follow_table_key(self, conn, owner, parent))

    def query(self, fn: Callable[[], T], owner: str) -> T:
        """Run a key-table (or row) query; a database failure becomes ours."""
        return self.store.query(fn, owner)

    # -- creation -----------------------------------------------------------------

    def create(
        self,
        conn: Connection,
        owner: str,
        count: int,
        digests: Sequence[bytes | None] | None = None,
        *,
        defer: bool = False,
    ) -> list[CachedKey]:
        """Make ``count`` row keys for ``owner`` and insert them on ``conn``
        in one executemany, in the caller's transaction. ``digests`` binds
        each key to its row where the row is known (:mod:`.binding`); a key
        made without one is bound later with :meth:`bind`.

        ``defer``: the caller will call :meth:`bind` for every key made without
        a digest once its row's primary key is known (after the INSERT the key
        protects, in the same transaction): those keys are then wrapped once,
        bound, and inserted by :meth:`bind`, instead of being inserted unbound
        here and re-wrapped and UPDATEd there. Only inside a transaction (not
        with AUTOCOMMIT, where the row would commit before its key)."""
        if count <= 0:
            return []
        defer = defer and not conn._is_autocommit_isolation()
        now = kt.utcnow()
        ids = fmt.new_key_ids(count)
        bound: list[bytes | None] = list(digests) if digests is not None else [None] * count
        rows: list[tuple[Any, ...]] = []  # keyrows.VARYING
        made: list[Any] = []  # RowKeyCipher, parallel to ids: no tuple per key (see cache.put_bound)
        later: list[tuple[int, Any, list[bytes | None]]] = []  # chunks with keys for bind(): (start, table key, wraps)
        # each wrap is an AES-GCM encryption under the table key: all are counted
        step = max(1, self.store.budget.batch(2 * count) // 2)
        for start in range(0, count, step):
            chunk, chunk_bound = ids[start : start + step], bound[start : start + step]
            # one wrap per key (a deferred key's is made by bind()), two for a key bound later without defer
            unbound = chunk_bound.count(None)
            with self.tracker.use_connection(conn):  # at most one provider call per table key
                parent = self.store.encryption_key(owner, kt.SCOPE_TABLE, uses=len(chunk) + (0 if defer else unbound))
            wrap = [d is not None for d in chunk_bound] if defer and unbound else None
            wrapped, cipher_objects = ciphers.wrap_row_keys(
                parent.cipher, parent.key_id, owner, chunk, chunk_bound, wrap
            )
            made += cipher_objects
            pid = parent.key_id
            rows += [(k, pid, w, d) for k, w, d in zip(chunk, wrapped, chunk_bound) if w is not None]
            if unbound:
                later.append((start, parent, wrapped))
        self.tracker.state(conn).rows.update(ids)
        if rows:
            shared = keyrows.shared_values(owner, now)
            self.query(lambda: keyrows.insert_key_rows(conn, self.table, shared, rows), owner)
        self.keys_created += count
        head_byte, n = bytes((fmt.VERSION_GCM,)), fmt.KEY_ID_LEN
        entries = self.cache.put_bound(ids, made, [head_byte + k.to_bytes(n, "big") for k in ids], bound)
        for start, parent, wrapped in later:
            _mark_unbound(entries, bound, start, parent, wrapped)
        return entries

    def bind(
        self,
        conn: Connection,
        owner: str,
        entries: Sequence[CachedKey],
        digests: Sequence[bytes | None],
        unknown: Sequence[CachedKey] = (),
    ) -> None:
        """Bind keys made by :meth:`create` without a digest to their rows
        (``entries`` and their rows' ``digests``, parallel: no tuple per key),
        once the rows' primary keys are known (after the INSERT: autoincrement),
        on ``conn``, in the same transaction. A key whose insert was deferred is
        wrapped once, bound (version 2), and inserted now; one inserted unbound
        (AUTOCOMMIT) is re-wrapped as version 2 and its digest recorded by an
        UPDATE. ``unknown``: deferred keys whose row's primary key could not be
        learnt: inserted unbound (version 1), so their values still open."""
        now = kt.utcnow()
        rows: list[tuple[Any, ...]] = []  # keyrows.VARYING
        params: list[dict[str, Any]] = []
        every, bound = [*entries, *unknown], [*digests, *([None] * len(unknown))]
        keep = [i for i, entry in enumerate(every) if entry.wrapped]
        done, done_digests = [every[i] for i in keep], [bound[i] for i in keep]
        for entry, digest, rewrapped in zip(done, done_digests, _wrapped_now(owner, done, done_digests)):
            parent, wrapped = entry.wrapped
            if wrapped is None:
                rows.append((entry.key_id, parent.key_id, rewrapped, digest))
            elif digest is not None:
                params.append({"_id": entry.key_id, "row_digest": digest, "updated_at": now, "wrapped_key": rewrapped})
        if rows:
            shared = keyrows.shared_values(owner, now)
            self.query(lambda: keyrows.insert_key_rows(conn, self.table, shared, rows), owner)
        if params:
            t = self.table
            stmt = (
                update(t)
                .where(t.c.id == bindparam("_id"))
                .values(
                    row_digest=bindparam("row_digest"),
                    wrapped_key=bindparam("wrapped_key"),
                    updated_at=bindparam("updated_at"),
                )
            )
            self.query(lambda: conn.execute(stmt, params), owner)
        for entry, digest in zip(done, done_digests):
            entry.bound, entry.wrapped = digest, None

    # -- loading --------------------------------------------------------------------

    def decryption_key(self, key_id: int, *, table: str, column: str | None) -> CachedKey | None:
        """The key of a row-scoped value; ``None`` when it was shredded.

        A key absent from the key table raises :class:`KeyNotFoundError`:
        only a tombstone (status shredded) means "erased on purpose".
        """
        entry = self.cache.get(key_id)
        if entry is None:
            conn = self.tracker.current()
            if conn is None:
                # No connection, or one still streaming rows: read on another.
                # Keys this transaction created are cached since creation.
                with self.store.engine.connect() as own, self.tracker.use_connection(own):
                    self.load(own, [key_id], table=table, column=column)
            else:
                self.load(conn, [key_id], table=table, column=column)
            entry = self.cache.get(key_id)
            if entry is None:
                # Not a row key (a value written before the column became
                # row-scoped) or missing: the table-key path knows both.
                return self.store.decryption_key(key_id, table=table, column=column or "")
        return entry if entry.cipher is not None else None

    def load(self, conn: Connection, key_ids: Iterable[int], *, table: str, column: str | None) -> None:
        """Load row keys into the cache with few queries (:data:`keyrows.IN_CHUNK`
        ids per ``IN``, or per ``= ANY(array)`` on PostgreSQL). Loaded keys are not marked
        as this transaction's: a key inserted by it was marked at creation."""
        # a tampered header may name an id no BIGINT holds: never stored, and
        # PostgreSQL would refuse the query (the caller reports it not found)
        ids = [k for k in key_ids if fmt.is_key_id(k)]
        pg = conn.dialect.name == "postgresql"
        chunk_size = IN_CHUNK
        stmt = self._select_keys(conn, pg)
        raw = _plain_columns(stmt, conn.dialect)
        pgarrays.prepare(conn)
        parents: dict[int, Any] = {}  # per table key: its cached entry, looked up once
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            params = {"ids": chunk}
            self.key_queries += 1
            rows = self.query(lambda: _fetch(conn, stmt, params, raw), table)
            self._open_rows(rows, parents, table, column)

    def _select_keys(self, conn: Connection, pg: bool) -> Any:
        """The key-row query, once per dialect kind and driver: the columns
        :func:`ciphers.open_many` reads, then the scope, checked in Python
        (:meth:`_open_rows`): with ``AND scope = 'row'``, PostgreSQL on an
        unanalysed key table bitmap-scanned the scope index over every row key
        for each 1,000 ids (1,000,000 keys: 190-630 ms a query, 2-6 ms by id)."""
        kind = (pg, conn.dialect.driver in pgarrays.PSYCOPG)
        cached = self._statements.get(kind)
        if cached is not None:
            return cached
        t = self.table
        cols = (t.c.id, t.c.wrapped_key, t.c.row_digest, t.c.parent_id, t.c.owner_table, t.c.status, t.c.scope)
        if pg:
            match = t.c.id == any_(pgarrays.array_param(conn, "ids", "bigint"))  # one array parameter
        else:
            match = t.c.id.in_(bindparam("ids", expanding=True))
        stmt = self._statements[kind] = select(*cols).where(match)
        return stmt

    def _open_rows(self, rows: Sequence[Any], parents: dict[int, Any], table: str, column: str | None) -> None:
        """Unwrap and cache the row keys of key rows ``(id, wrapped, digest,
        parent, owner, status, scope)``: one :func:`ciphers.open_many` per (table key,
        owner), tombstones cached with no cipher. A key row that does not
        unwrap fails the whole batch (nothing of it cached), naming its key id.
        A row of another scope, or with no parent, is no row key: it is left
        to the table-key path, which checks it against its own associated data."""
        groups: dict[tuple[int, str], list[Any]] = {}
        dead: list[Any] = []
        bound: list[bytes | None] = []
        parent_id, owner, members = None, None, dead  # the group of the row before (one table key, usually)
        row_scope = kt.SCOPE_ROW
        for r in rows:
            if r[3] is None or r[6] != row_scope:  # not a row key (the table-key path refuses or serves it)
                continue
            if r[1] is None or r[5] == kt.SHREDDED:
                dead.append(r)
                continue
            if r[3] != parent_id or r[4] != owner:
                parent_id, owner = r[3], r[4]
                members = groups.setdefault((parent_id, owner), [])
            members.append(r)
        # parallel lists, not a tuple per key: a tuple holding a cipher object
        # stays tracked by the garbage collector (see _fetch)
        cipher, head_byte, n = ciphers.RowKeyCipher, bytes((fmt.VERSION_GCM,)), fmt.KEY_ID_LEN
        key_ids: list[int] = []
        opened: list[Any] = []  # RowKeyCipher: no OpenSSL state until used
        for (parent_id, owner), members in groups.items():
            parent = parents.get(parent_id)
            if parent is None:
                parent = parents[parent_id] = self.store.decryption_key(parent_id, table=table, column=column or "")
            try:
                plains = ciphers.open_many(parent.cipher, parent.head[0], parent_id, owner, members)
            except fmt.InvalidEnvelope as exc:
                key_id = fmt.format_key_id(members[getattr(exc, "index", 0)][0])
                raise DecryptionError(str(exc), table=table, column=column, key_id=key_id) from None
            key_ids += [r[0] for r in members]
            opened += [cipher(plain) for plain in plains]
            bound += [_digest(r[2]) for r in members]
        key_ids += [r[0] for r in dead]
        opened += [None] * len(dead)
        bound += [_digest(r[2]) for r in dead]
        heads = [head_byte + k.to_bytes(n, "big") for k in key_ids]
        self.cache.put_bound(key_ids, opened, heads, bound)

    def missing(self, key_ids: Iterable[int]) -> set[int]:
        """Ids not in the cache (no statistics touched)."""
        entries = self.cache._entries
        return {k for k in key_ids if k not in entries}

    # -- shredding -----------------------------------------------------------------------

    def shred_key(self, conn: Connection, key_id: int, owner: str | None = None) -> None:
        """Destroy a row key's material on ``conn``; the row stays as a tombstone."""
        t = self.table
        where = [t.c.id == key_id, t.c.scope == kt.SCOPE_ROW]
        if owner is not None:
            where.append(t.c.owner_table == owner)
        stmt = update(t).where(*where).values(wrapped_key=None, status=kt.SHREDDED, updated_at=kt.utcnow())
        fault_point("shred.before_update")
        result = self.query(lambda: conn.execute(stmt), owner or t.name)
        fault_point("shred.after_update")
        self.tracker.state(conn).rows.add(key_id)  # a tombstone cached before a rollback must go with it
        self.cache.evict(key_id)
        self.store.cache.evict(key_id)
        if result.rowcount == 0:
            self._refuse_shred(conn, key_id, owner)

    def shred_keys(self, conn: Connection, key_ids: Sequence[int], owner: str) -> None:
        """Destroy many row keys of ``owner`` on ``conn``: one UPDATE per 1,000
        ids (:func:`.keyrows.shred_many`); the key rows stay as tombstones."""
        if not key_ids:
            return
        self.query(lambda: keyrows.shred_many(conn, self.table, key_ids, owner), owner)
        self.tracker.state(conn).rows.update(key_ids)  # tombstones cached before a rollback go with it
        for key_id in key_ids:
            self.cache.evict(key_id)
            self.store.cache.evict(key_id)

    def _refuse_shred(self, conn: Connection, key_id: int, owner: str | None) -> None:
        record = kt.get_record(conn, self.table, key_id)
        if record is None:
            raise KeyNotFoundError(table=owner, key_id=fmt.format_key_id(key_id))
        raise ConfigurationError(
            f"key {fmt.format_key_id(key_id)} is a {record.scope} key of table "
            f"{record.owner_table}: only row keys{'' if owner is None else ' of ' + owner} can be shredded",
            table=record.owner_table,
            key_id=fmt.format_key_id(key_id),
        )


def _plain_columns(stmt: Any, dialect: Any) -> bool:
    """No column of the key-row query has a result processor on ``dialect``
    (none has on the supported drivers): its DBAPI rows are what
    SQLAlchemy's rows would hold."""
    return all(c.type._cached_result_processor(dialect, None) is None for c in stmt.selected_columns)


def _fetch(conn: Connection, stmt: Any, params: dict[str, Any], raw: bool) -> Sequence[Any]:
    """The key rows of one query: the DBAPI's own tuples where ``raw``.
    Why: 10,000 key rows a partition, and a SQLAlchemy ``Row`` is an object
    the garbage collector tracks (a tuple of ints, bytes and strings is
    untracked at its first collection): the rows lived through
    :meth:`RowKeys._open_rows` into the old generation and made a stream
    run a full collection per partition."""
    result = conn.execute(stmt, params)
    if not raw or result.cursor_strategy is not _DEFAULT_FETCH:  # rows buffered by SQLAlchemy (yield_per)
        return result.all()
    try:
        return result.cursor.fetchall()
    finally:
        result.close()


def _digest(value: Any) -> bytes | None:
    """A key row's ``row_digest`` as bytes (psycopg2 reads ``BYTEA`` as a memoryview)."""
    return value if value is None or type(value) is bytes else bytes(value)


def _wrapped_now(owner: str, entries: Sequence[CachedKey], digests: Sequence[bytes | None]) -> list[bytes]:
    """The wraps of the keys :meth:`RowKeys.bind` binds, in the order given:
    one :func:`ciphers.wrap_many` per table key (a batch made across a
    roll-over has two); the material from each entry's cipher."""
    groups: dict[int, list[int]] = {}
    for i, entry in enumerate(entries):
        groups.setdefault(id(entry.wrapped[0]), []).append(i)
    wraps: list[bytes] = [b""] * len(entries)
    for members in groups.values():
        parent = entries[members[0]].wrapped[0]
        key_ids = [entries[i].key_id for i in members]
        plains = [entries[i].cipher.material for i in members]
        made = ciphers.wrap_many(parent.cipher, parent.key_id, owner, key_ids, plains, [digests[i] for i in members])
        for i, w in zip(members, made):
            wraps[i] = w
    return wraps


def _mark_unbound(
    entries: list[CachedKey], bound: list[bytes | None], start: int, parent: Any, wrapped: list[bytes | None]
) -> None:
    """What :meth:`RowKeys.bind` needs of each key of one chunk made without
    a digest, in its entry's ``wrapped``: ``(table key, None)`` where its
    insert waits for bind (one tuple shared by the chunk's keys: no object
    per key), or ``(table key, version-1 wrap)`` where it was inserted
    unbound (AUTOCOMMIT). The material stays in the entry's cipher only."""
    deferred = (parent, None)
    for j, w in enumerate(wrapped):
        if bound[start + j] is None:
            entries[start + j].wrapped = deferred if w is None else (parent, w)
