"""Row keys bound to their row: the row digest, and the key that makes it.

A row key's key row records ``row_digest``: HMAC-SHA256 of the row's table
and primary key, under a per-table *digest key*. The digest is in the row
key's wrap (version 2, associated data: :mod:`sa_envelope.envelope.ciphers`),
so a key row relabelled to another row does not unwrap. With it:

* writing a row-scoped value uses the key bound to *that* row, found by its
  digest, never the key some stored ciphertext names (a value copied from
  row 4 into row 5 cannot make row 5's new values go under row 4's key);
* reading refuses a value whose key is bound to another row, wherever the
  row's primary key is in the result (:mod:`.prefetch`);
* shredding a row finds every key it ever had, and the orphan sweep finds
  keys whose row is gone, without any value naming them.

The digest is keyed so that the key table holds no primary keys (which may
be personal identifiers) and does not let anyone link key rows to rows by
guessing ids. The digest key: 32 random bytes per table, stored as a key row
of scope ``row-digest`` with a fixed id per table (so concurrent first
writers insert the same row and one wins), wrapped locally by the table key
with the row-key wrap (version 1), and cached in the row-key cache (evicted
with a transaction that rolls back, like a row key). Creating it is a local
AES call, never a provider call.

Primary-key values are encoded type-blind (``str``; ``UUID`` as hex, bytes
as hex), each length-prefixed, so the ORM's identity, a Core caller's tuple
and a database row's processed values give the same digest.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Iterable, Sequence

from sqlalchemy import Connection, and_, any_, select, update

from ..envelope import ciphers
from ..envelope import format as fmt
from ..errors import DecryptionError
from ..keys import table as kt
from . import pgarrays
from .keyrows import IN_CHUNK

__all__ = [
    "DIGEST_SCOPE",
    "bound_row_key",
    "digest_key",
    "find_bound",
    "follow_table_key",
    "pk_bytes",
    "row_digest",
    "row_digests",
    "unbound_live",
]

DIGEST_SCOPE = "row-digest"
DIGEST_ALGORITHM = "HMAC-SHA256"
_CONTEXT = b"sa-envelope row digest\x00"


def pk_bytes(pk: Sequence[Any]) -> bytes:
    """The canonical encoding of a primary key's values."""
    out = bytearray()
    for value in pk:
        if isinstance(value, uuid.UUID):
            text = value.hex
        elif isinstance(value, (bytes, bytearray, memoryview)):
            text = bytes(value).hex()
        else:
            text = str(value)
        data = text.encode("utf-8")
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


def row_digest(key: Any, pk: Sequence[Any]) -> bytes:
    """The digest of one row under ``key`` (the HMAC object :func:`digest_key` gives)."""
    mac = key.copy()
    mac.update(pk_bytes(pk))
    return bytes(mac.digest())


def row_digests(key: Any, pks: Sequence[Sequence[Any] | None]) -> list[bytes | None]:
    """:func:`row_digest` of many rows (``None`` stays ``None``): one call for an executemany."""
    copy = key.copy
    out: list[bytes | None] = []
    for pk in pks:
        if pk is None:
            out.append(None)
            continue
        if len(pk) == 1 and type(pk[0]) is int:  # the usual integer primary key: pk_bytes, inlined
            data = str(pk[0]).encode("ascii")
            encoded = len(data).to_bytes(4, "big") + data
        else:
            encoded = pk_bytes(pk)
        mac = copy()
        mac.update(encoded)
        out.append(mac.digest())
    return out


def digest_key(rows: Any, conn: Connection, owner: str, *, create: bool) -> Any | None:
    """The HMAC object keyed for ``owner``'s row digests, or ``None`` if the
    table has none yet and ``create`` is false. Made on ``conn``, in the
    caller's transaction, the first time a row of ``owner`` is bound."""
    key_id = kt.singleton_key_id(owner, DIGEST_SCOPE)
    entry = rows.cache.get(key_id)
    if entry is not None and entry.cipher is not None:
        return entry.cipher
    record = rows.query(lambda: kt.get_record(conn, rows.table, key_id), owner)
    if record is None:
        if not create:
            return None
        plain = os.urandom(32)
        if _insert(rows, conn, owner, key_id, plain):
            return _cache(rows, owner, key_id, plain)
        record = rows.query(lambda: kt.get_record(conn, rows.table, key_id), owner)  # a concurrent writer's
    return _cache(rows, owner, key_id, _open(rows, owner, record))


def _insert(rows: Any, conn: Connection, owner: str, key_id: int, plain: bytes) -> bool:
    with rows.tracker.use_connection(conn):
        parent = rows.store.encryption_key(owner, kt.SCOPE_TABLE)
    wrapped = ciphers.wrap_row_key(parent.cipher, parent.key_id, owner, key_id, plain)
    record = kt.KeyRecord(
        id=key_id,
        scope=DIGEST_SCOPE,
        owner_table=owner,
        parent_id=parent.key_id,
        wrapping_key_id=kt.PARENT,
        wrapped_key=wrapped,
        algorithm=DIGEST_ALGORITHM,
        status=kt.ACTIVE,
    )
    rows.tracker.state(conn).rows.add(key_id)  # forgotten if this transaction rolls back
    return bool(rows.query(lambda: kt.insert_record(conn, rows.table, record, if_absent=True), owner))


def follow_table_key(rows: Any, conn: Connection, owner: str, parent: Any) -> None:
    """Re-wrap ``owner``'s digest key under its new table key ``parent``, in
    the roll-over's transaction. So the digest key always sits under the
    current table key: a database writer who alters a retired table key
    destroys what that key protects, never the binding of new rows."""
    key_id = kt.singleton_key_id(owner, DIGEST_SCOPE)
    record = rows.query(lambda: kt.get_record(conn, rows.table, key_id), owner)
    if record is None or record.parent_id == parent.key_id:
        return
    plain = _open(rows, owner, record)
    wrapped = ciphers.wrap_row_key(parent.cipher, parent.key_id, owner, key_id, plain)
    t = rows.table
    stmt = (
        update(t).where(t.c.id == key_id).values(parent_id=parent.key_id, wrapped_key=wrapped, updated_at=kt.utcnow())
    )
    rows.query(lambda: conn.execute(stmt), owner)
    rows.tracker.state(conn).rows.add(key_id)  # a rollback undoes it: the cached key is evicted


def _open(rows: Any, owner: str, record: kt.KeyRecord | None) -> bytes:
    """The digest key's material from its key row, checked as a row key's is."""
    where = {"table": owner, "key_id": fmt.format_key_id(kt.singleton_key_id(owner, DIGEST_SCOPE))}
    if (
        record is None
        or record.scope != DIGEST_SCOPE
        or record.owner_table != owner
        or record.parent_id is None
        or record.wrapped_key is None
    ):
        raise DecryptionError("the row digest key is missing or altered", **where)
    parent = rows.store.decryption_key(record.parent_id, table=owner, column="")
    try:
        return ciphers.open_row_key(
            parent.cipher, parent.head[0], record.id, record.parent_id, owner, record.wrapped_key
        )
    except fmt.InvalidEnvelope:
        raise DecryptionError("the row digest key does not unwrap under its table key", **where) from None


def _cache(rows: Any, owner: str, key_id: int, plain: bytes) -> Any:
    mac = ciphers.HmacKey(plain).subkey(_CONTEXT + owner.encode("utf-8"))
    # version byte 0: a value header naming this key never opens under it
    return rows.cache.put(key_id, mac, fmt.header(0, key_id)).cipher


def find_bound(
    rows: Any, conn: Connection, owner: str, digests: Iterable[bytes], *, live_only: bool = True
) -> list[tuple[int, bytes]]:
    """``(key id, digest)`` of the row keys of ``owner`` bound to these digests."""
    t = rows.table
    wanted = list(dict.fromkeys(digests))
    found: list[tuple[int, bytes]] = []
    pg = conn.dialect.name == "postgresql"
    step = IN_CHUNK
    pgarrays.prepare(conn)
    for start in range(0, len(wanted), step):
        chunk = wanted[start : start + step]
        # PostgreSQL: one array parameter, not thousands (the driver parses every placeholder)
        if pg:
            match = t.c.row_digest == any_(pgarrays.array_param(conn, "digests", "bytea", chunk))
        else:
            match = t.c.row_digest.in_(chunk)
        where = [t.c.owner_table == owner, t.c.scope == kt.SCOPE_ROW, match]
        if live_only:
            where.append(t.c.status == kt.ACTIVE)
        stmt = select(t.c.id, t.c.row_digest).where(and_(*where)).order_by(t.c.id)
        found += [(r[0], bytes(r[1])) for r in rows.query(lambda: conn.execute(stmt).all(), owner)]
    return found


def bound_row_key(rows: Any, conn: Connection, owner: str, pk: Sequence[Any]) -> Any:
    """A new row key for the row ``pk`` of ``owner``, bound to it (Core API)."""
    digest = row_digest(digest_key(rows, conn, owner, create=True), pk)
    return rows.create(conn, owner, 1, [digest])[0]


def unbound_live(rows: Any, conn: Connection, owner: str, key_ids: Iterable[int]) -> set[int]:
    """Those of ``key_ids`` that are live row keys of ``owner`` bound to no row."""
    t = rows.table
    ids = [k for k in key_ids if fmt.is_key_id(k)]
    out: set[int] = set()
    for start in range(0, len(ids), IN_CHUNK):
        stmt = select(t.c.id).where(
            t.c.id.in_(ids[start : start + IN_CHUNK]),
            t.c.owner_table == owner,
            t.c.scope == kt.SCOPE_ROW,
            t.c.status == kt.ACTIVE,
            t.c.row_digest.is_(None),
        )
        out.update(rows.query(lambda: conn.execute(stmt).scalars().all(), owner))
    return out
