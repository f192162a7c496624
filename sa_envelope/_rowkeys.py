"""Row keys: one data key per row, wrapped locally by its table key.

Why a key per row: shredding. Destroy one row's key and that row's
row-scoped values are unreadable wherever they were copied (replicas, exports,
backups), while every other row still reads. Only table keys are wrapped by
the KMS; a row key is ``os.urandom(32)`` wrapped with AES-256-GCM under its
table key, with associated data binding the row key id, the table key id and
the owner table (:func:`row_key_ad`). Creating or unwrapping a row key is
therefore a local AES call, never a provider call: 20,000 new rows cost the
one ``GenerateDataKey`` (or ``Decrypt``) of their table key.

Stored wrapped form (column ``wrapped_key``, ``wrapping_key_id = "parent"``)::

    01 | nonce (12) | AES-256-GCM(row key) | tag (16)

    associated data: b"sa-envelope row key\x00" | row key id (8, big-endian)
                     | table key id (8, big-endian) | owner table (UTF-8)

**Where a row's key comes from.** A row key is named by the header of each
row-scoped value (as every key is): the row itself is the index from row to
key, so the key table needs no column pointing back at user rows, and a row
with no row-scoped value has no key. Writing goes through :class:`RowValue`:
a value paired with the row key it must be sealed under. The ORM hooks
(``_roworm``) build those pairs; a bare value reaching a row-scoped column
raises :class:`~sa_envelope.RowKeyRequiredError`, so nothing is ever sealed
under a key that was not inserted in the same transaction.

**Caching.** Row keys live in their own :class:`KeyCache`, much larger than
the table-key cache (20,000 rows would thrash 1,000 slots), with the same age
and use limits: a row key is only as fresh as the table key that unwraps it.
A shredded key is cached as a tombstone (cipher ``None``) once *read* from the
key table, so a shred done by another process is honoured as soon as this
process reloads the key, and at the latest after ``CacheLimits.max_age``.
Keys inserted, and keys shredded, by a transaction that rolls back are
evicted with it (a tombstone read inside a rolled-back shred must not stay).

**Reading without a query per row.** ``_rowprefetch`` looks at every SELECT
that returns row-scoped columns of this manager, collects the key ids from the
value headers and loads the missing keys with a few ``IN`` queries before the
rows are processed.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import BigInteger, Connection, Table, any_, bindparam, event, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from . import _format as fmt
from . import _keytable as kt
from ._cache import CacheLimits, CachedKey, KeyCache
from ._errors import ConfigurationError, DecryptionError, KeyNotFoundError, RowKeyRequiredError
from ._faults import fault_point

__all__ = [
    "ROW_CACHE_SIZE",
    "RowKey",
    "RowKeys",
    "RowValue",
    "open_wrapped",
    "row_key_ad",
    "row_key_of",
    "unwrap_row_key",
]

ROW_KEY_BYTES = 32
WRAPPED_LEN = 1 + fmt.NONCE_LEN + ROW_KEY_BYTES + fmt.TAG_LEN  # version, nonce, sealed key, tag
ROW_WRAP_VERSION = 0x01
ROW_CACHE_SIZE = 65_536
PARENT = "parent"  # wrapping_key_id of a key wrapped by its parent key
ALGORITHM = "AES-256-GCM"
IN_CHUNK = 1_000  # ids per IN (...) query
PG_CHUNK = 10_000  # ids per = ANY(:array) query on PostgreSQL
COPY_MIN_ROWS = 100  # below this, a plain executemany is as fast as COPY
_AD_LABEL = b"sa-envelope row key\x00"
_GCM_BYTE = bytes((fmt.VERSION_GCM,))
_WRAP_BYTE = bytes((ROW_WRAP_VERSION,))


def row_key_ad(key_id: int, parent_id: int, owner: str) -> bytes:
    """Associated data of a wrapped row key: it unwraps only as this key,
    under this parent, for this table (the owner comes last: unambiguous)."""
    return _AD_LABEL + key_id.to_bytes(8, "big") + parent_id.to_bytes(8, "big") + owner.encode("utf-8")


def unwrap_row_key(parent: CachedKey, record: Any, *, table: str, column: str | None) -> bytes:
    """Open a wrapped row key (``record`` is a :class:`KeyRecord` or a row)."""
    return open_wrapped(parent, record.id, record.parent_id, record.owner_table, record.wrapped_key, table, column)


def open_wrapped(
    parent: CachedKey, key_id: int, parent_id: int, owner: str, wrapped: Any, table: str, column: str | None
) -> bytes:
    """The one place a wrapped row key is opened (format in the module docstring)."""
    wrapped = bytes(wrapped)
    try:
        # A tampered row may name a parent that is no AES-GCM table key, or hold
        # bytes too short for a nonce (a ValueError): both fail as a bad tag.
        if parent.head[0] != fmt.VERSION_GCM or len(wrapped) != WRAPPED_LEN or wrapped[0] != ROW_WRAP_VERSION:
            raise InvalidTag
        return bytes(parent.cipher.decrypt(wrapped[1:13], wrapped[13:], row_key_ad(key_id, parent_id, owner)))
    except (InvalidTag, IndexError):
        raise DecryptionError(
            "row key does not unwrap under its table key",
            table=table, column=column, key_id=fmt.format_key_id(key_id),
        ) from None


class RowValue:
    """A value to store in a row-scoped column, with the row key to seal it.

    The ORM hooks put these in the flush parameters; Core users get them from
    :meth:`RowKey.value`. Never stored, never shown: repr hides the value.
    """

    __slots__ = ("value", "key")

    def __init__(self, value: Any, key: CachedKey) -> None:
        self.value = value
        self.key = key

    def __repr__(self) -> str:
        return f"RowValue(<hidden>, key={fmt.format_key_id(self.key.key_id)})"


class RowKey:
    """A row key already inserted in the caller's transaction (Core API)."""

    __slots__ = ("_key", "owner")

    def __init__(self, key: CachedKey, owner: str) -> None:
        self._key = key
        self.owner = owner

    @property
    def key_id(self) -> int:
        return self._key.key_id

    def value(self, value: Any) -> RowValue | None:
        """Wrap ``value`` for a row-scoped column of this row (``None`` stays NULL)."""
        return None if value is None else RowValue(value, self._key)

    def __repr__(self) -> str:
        return f"RowKey({fmt.format_key_id(self.key_id)}, owner={self.owner!r})"


def row_key_of(value: Any, table: str, column: str | None) -> tuple[CachedKey, Any]:
    """The bind path: a row-scoped column accepts only :class:`RowValue`."""
    if type(value) is RowValue:
        return value.key, value.value
    raise RowKeyRequiredError(table=table, column=column)


class RowKeys:
    """A KeyManager's row keys: creation, loading, cache, shredding."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.table: Table = manager.table
        limits: CacheLimits = manager._cache.limits
        self.cache = KeyCache(CacheLimits(max(ROW_CACHE_SIZE, limits.max_size), limits.max_age, limits.max_uses))
        self._state_key = f"sa_envelope_rowkeys_{id(self)}"
        self.streaming_key = f"sa_envelope_streaming_{id(self)}"  # set by _rowprefetch
        self.keys_created = 0
        self.key_queries = 0
        engine = manager.engine
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, "rollback", self._on_rollback)
        event.listen(engine, "rollback_savepoint", self._on_rollback_savepoint)
        event.listen(engine, "reset", self._on_pool_reset)

    # -- transaction fate: keys seen only inside a transaction ----------------------

    def _touched(self, conn: Connection) -> set[int]:
        ids = conn.info.get(self._state_key)
        if ids is None:
            ids = conn.info[self._state_key] = set()
        return ids

    def _on_commit(self, conn: Connection) -> None:
        conn.info.pop(self._state_key, None)

    def _on_rollback(self, conn: Connection) -> None:
        self._evict(conn.info.pop(self._state_key, ()))

    def _on_rollback_savepoint(self, conn: Connection, name: Any, context: Any) -> None:
        self._evict(conn.info.get(self._state_key, ()))  # reloaded from the table if still there

    def _on_pool_reset(self, dbapi_conn: Any, record: Any, reset_state: Any) -> None:
        self._evict(record.info.pop(self._state_key, ()))

    def _evict(self, ids: Iterable[int]) -> None:
        for key_id in ids:
            self.cache.evict(key_id)

    # -- creation -----------------------------------------------------------------

    def create(self, conn: Connection, owner: str, count: int) -> list[CachedKey]:
        """Make ``count`` row keys for ``owner`` and insert them on ``conn``
        in one executemany, in the caller's transaction."""
        if count <= 0:
            return []
        m = self.manager
        with m.use_connection(conn):
            parent = m.encryption_key(owner, kt.SCOPE_TABLE)  # at most one provider call
        material = os.urandom(ROW_KEY_BYTES * count)
        now = kt.utcnow()
        rows: list[dict[str, Any]] = []
        opened: list[tuple[int, Any, bytes]] = []
        touched = self._touched(conn)
        ad_tail = parent.key_id.to_bytes(8, "big") + owner.encode("utf-8")  # row_key_ad, hoisted
        seal, nonces = parent.cipher.encrypt, os.urandom(fmt.NONCE_LEN * count)
        ids = os.urandom(8 * count)
        for i in range(count):
            key_id = (int.from_bytes(ids[i * 8 : (i + 1) * 8], "big") >> 1) or kt.new_key_id()  # 63 bits
            plain = material[i * ROW_KEY_BYTES : (i + 1) * ROW_KEY_BYTES]
            nonce = nonces[i * fmt.NONCE_LEN : (i + 1) * fmt.NONCE_LEN]
            wrapped = _WRAP_BYTE + nonce + seal(nonce, plain, _AD_LABEL + key_id.to_bytes(8, "big") + ad_tail)
            rows.append({
                "id": key_id, "scope": kt.SCOPE_ROW, "owner_table": owner,
                "parent_id": parent.key_id, "wrapping_key_id": PARENT, "wrapped_key": wrapped,
                "algorithm": ALGORITHM, "status": kt.ACTIVE, "created_at": now, "updated_at": now,
            })
            touched.add(key_id)
            opened.append((key_id, AESGCM(plain), fmt.header(fmt.VERSION_GCM, key_id)))
        fault_point("rowkey.create.before_insert")
        m._db(lambda: self._insert_rows(conn, rows), owner)
        fault_point("rowkey.create.after_insert")
        self.keys_created += count
        return self.cache.put_many(opened)

    def _insert_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """One executemany; with psycopg 3, a COPY on the same DBAPI connection
        (same transaction), which costs a tenth of the executemany's client time."""
        if conn.dialect.driver != "psycopg" or len(rows) < COPY_MIN_ROWS:
            conn.execute(self.table.insert(), rows)
            return
        names = list(rows[0])
        quote = conn.dialect.identifier_preparer
        sql = f"COPY {quote.format_table(self.table)} ({', '.join(quote.quote(n) for n in names)}) FROM STDIN"
        with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            with cursor.copy(sql) as copy:
                for row in rows:
                    copy.write_row([row[n] for n in names])

    # -- loading --------------------------------------------------------------------

    def decryption_key(self, key_id: int, *, table: str, column: str | None) -> CachedKey | None:
        """The key of a row-scoped value; ``None`` when it was shredded.

        A key absent from the key table raises :class:`KeyNotFoundError`:
        only a tombstone (status shredded) means "erased on purpose".
        """
        entry = self.cache.get(key_id)
        if entry is None:
            conn = self.manager._current()
            if conn is None or conn.info.get(self.streaming_key):
                # No connection, or one still streaming rows: read on another.
                # Keys this transaction created are cached since creation.
                with self.manager.engine.connect() as own, self.manager.use_connection(own):
                    self.load(own, [key_id], table=table, column=column)
            else:
                self.load(conn, [key_id], table=table, column=column)
            entry = self.cache.get(key_id)
            if entry is None:
                # Not a row key (a value written before the column became
                # row-scoped) or missing: the table-key path knows both.
                return self.manager.decryption_key(key_id, table=table, column=column or "")
        return entry if entry.cipher is not None else None

    def load(self, conn: Connection, key_ids: Iterable[int], *, table: str, column: str | None) -> None:
        """Load row keys into the cache with few queries (1,000 ids per ``IN``;
        10,000 per ``= ANY(array)`` on PostgreSQL). Loaded keys are not marked
        as this transaction's: a key inserted by it was marked at creation."""
        # a tampered header may name an id no BIGINT holds: never stored, and
        # PostgreSQL would refuse the query (the caller reports it not found)
        ids = [k for k in key_ids if 0 < k < 1 << 63]
        chunk_size = PG_CHUNK if conn.dialect.name == "postgresql" else IN_CHUNK
        parents: dict[int, CachedKey] = {}
        for start in range(0, len(ids), chunk_size):
            chunk = ids[start : start + chunk_size]
            self.key_queries += 1
            rows = self.manager._db(lambda: conn.execute(self._select_keys(conn, chunk)).all(), table)
            # parent_id None: a table key, which the manager's own cache serves
            self.cache.put_many([self._opened(r, parents, table, column) for r in rows if r[1] is not None])

    def _select_keys(self, conn: Connection, ids: Sequence[int]) -> Any:
        t = self.table
        cols = (t.c.id, t.c.parent_id, t.c.owner_table, t.c.wrapped_key, t.c.status)
        if conn.dialect.name == "postgresql":  # one array parameter, not thousands
            return select(*cols).where(t.c.id == any_(bindparam("ids", list(ids), type_=ARRAY(BigInteger))))
        return select(*cols).where(t.c.id.in_(ids))

    def _opened(
        self, row: Any, parents: dict[int, CachedKey], table: str, column: str | None
    ) -> tuple[int, Any, bytes]:
        """``(key id, cipher, head)`` of a key row; cipher ``None`` for a tombstone.

        Runs once per row key read (20,000 times for 20,000 rows): kept to
        tuple indexing and two AES calls, no intermediate objects.
        """
        key_id, parent_id, owner, wrapped, status = row
        head = _GCM_BYTE + key_id.to_bytes(8, "big")
        if wrapped is None or status == kt.SHREDDED:
            return key_id, None, head
        parent = parents.get(parent_id)
        if parent is None:
            parent = parents[parent_id] = self.manager.decryption_key(parent_id, table=table, column=column or "")
        return key_id, AESGCM(open_wrapped(parent, key_id, parent_id, owner, wrapped, table, column)), head

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
        result = self.manager._db(lambda: conn.execute(stmt), owner or t.name)
        fault_point("shred.after_update")
        self._touched(conn).add(key_id)  # a tombstone cached before a rollback must go with it
        self.cache.evict(key_id)
        self.manager._cache.evict(key_id)
        if result.rowcount == 0:
            self._refuse_shred(conn, key_id, owner)

    def _refuse_shred(self, conn: Connection, key_id: int, owner: str | None) -> None:
        record = kt.get_record(conn, self.table, key_id)
        if record is None:
            raise KeyNotFoundError(table=owner, key_id=fmt.format_key_id(key_id))
        raise ConfigurationError(
            f"key {fmt.format_key_id(key_id)} is a {record.scope} key of table "
            f"{record.owner_table}: only row keys{'' if owner is None else ' of ' + owner} can be shredded",
            table=record.owner_table, key_id=fmt.format_key_id(key_id),
        )
