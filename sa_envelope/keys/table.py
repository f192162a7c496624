"""The key table ``sa_envelope_keys``: its schema and the queries on it.

Plain SQLAlchemy metadata, so ``create_all`` and Alembic treat it like any
table. It holds wrapped keys only; plaintext never reaches it. Every query
runs on a connection the caller passes, so key rows are written inside the
caller's transaction and share its fate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    and_,
    select,
)
from sqlalchemy.dialects import mysql

from ..envelope import format as fmt

__all__ = [
    "ACTIVE",
    "DRAINING",
    "KeyRecord",
    "RETIRED",
    "SCOPE_BLIND_INDEX",
    "SCOPE_DETERMINISTIC",
    "SCOPE_ROW",
    "SCOPE_TABLE",
    "SHREDDED",
    "created_seconds",
    "find_active",
    "find_candidates",
    "get_record",
    "SCOPE_ALGORITHM",
    "get_record_locked",
    "insert_record",
    "key_table",
    "provider_wrapped",
    "singleton_key_id",
    "utcnow",
]

KEY_TABLE_NAME = "sa_envelope_keys"
SCOPE_TABLE = "table"
SCOPE_ROW = "row"
SCOPE_DETERMINISTIC = "deterministic"
SCOPE_BLIND_INDEX = "blind-index"  # HMAC key of a table's blind indexes (columns.blindindex)
SCOPE_ALGORITHM = {  # the one algorithm each scope's keys have (envelope.ciphers.ALGORITHMS)
    SCOPE_TABLE: "AES-256-GCM",
    SCOPE_ROW: "AES-256-GCM",
    SCOPE_DETERMINISTIC: "AES-256-SIV",
    SCOPE_BLIND_INDEX: "HMAC-SHA256",
}
PARENT = "parent"  # wrapping_key_id of a key wrapped by its parent key (row keys)
ACTIVE = "active"
RETIRED = "retired"
DRAINING = "draining"  # a replaced deterministic / blind-index key still matched by queries (keys.live)
SHREDDED = "shredded"


ROW_DIGEST_TYPE = LargeBinary(32).with_variant(mysql.VARBINARY(32), "mysql", "mariadb")  # indexable on MySQL


def key_table(metadata: MetaData, name: str = KEY_TABLE_NAME) -> Table:
    """Define the key table on ``metadata`` (or return it if already there)."""
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name,
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=False),
        Column("scope", String(16), nullable=False),
        Column("owner_table", String(255), nullable=False),
        Column("parent_id", BigInteger, nullable=True),
        Column("wrapping_key_id", String(2048), nullable=False),
        Column("wrapped_key", LargeBinary, nullable=True),
        Column("algorithm", String(32), nullable=False),
        Column("status", String(16), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        # the provider key context this row was wrapped with (providers.base):
        # NULL for rows written before the column existed, read as version 1
        Column("context_version", SmallInteger, nullable=True),
        # row keys: keyed digest of the row they are bound to (rows.binding); NULL otherwise
        Column("row_digest", ROW_DIGEST_TYPE, nullable=True),
        Index(f"ix_{name}_owner", "owner_table", "scope", "status"),
        Index(f"ix_{name}_parent", "parent_id"),
        Index(f"ix_{name}_row_digest", "row_digest"),
    )


@dataclass(frozen=True, repr=False)
class KeyRecord:
    """One row of the key table. Holds wrapped bytes only, never plaintext."""

    id: int
    scope: str
    owner_table: str
    parent_id: int | None
    wrapping_key_id: str
    wrapped_key: bytes | None
    algorithm: str
    status: str
    created_at: dt.datetime | None = None
    context_version: int | None = None  # None: written before versions (1)
    row_digest: bytes | None = None  # row keys bound to their row (rows.binding)

    def __repr__(self) -> str:
        return (
            f"KeyRecord(id={self.id:016x}, scope={self.scope!r}, owner={self.owner_table!r}, "
            f"status={self.status!r}, wrapping_key_id={self.wrapping_key_id!r})"
        )

    @classmethod
    def unwrapped(
        cls, key_id: int, scope: str, owner: str, algorithm: str, created: dt.datetime, version: int
    ) -> KeyRecord:
        """A provider-wrapped key about to be made: active, its wrap still to come."""
        return cls(key_id, scope, owner, None, "", None, algorithm, ACTIVE, created, version)

    @classmethod
    def from_row(cls, row: Any) -> KeyRecord:
        m = row._mapping
        wrapped = m["wrapped_key"]
        return cls(
            id=m["id"],
            scope=m["scope"],
            owner_table=m["owner_table"],
            parent_id=m["parent_id"],
            wrapping_key_id=m["wrapping_key_id"],
            wrapped_key=bytes(wrapped) if wrapped is not None else None,
            algorithm=m["algorithm"],
            status=m["status"],
            created_at=m["created_at"],
            context_version=m.get("context_version"),
            row_digest=bytes(m["row_digest"]) if m.get("row_digest") is not None else None,
        )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def created_seconds(created: dt.datetime | None) -> int:
    """A stored ``created_at`` as whole seconds since the epoch (SQLite and
    MariaDB return naive UTC), as the key context binds it."""
    if created is None:
        return 0
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.timezone.utc)
    return int(created.timestamp())


def find_candidates(conn: Connection, table: Table, owner: str, scope: str, limit: int) -> list[KeyRecord]:
    """The newest provider-wrapped keys of ``scope`` for ``owner``, whatever
    their status (a status is not authenticated: the write key is chosen
    among these by :class:`~.store.KeyStore`), newest first."""
    stmt = (
        select(table)
        .where(table.c.owner_table == owner, table.c.scope == scope, provider_wrapped(table))
        .order_by(table.c.created_at.desc(), table.c.id.desc())
        .limit(limit)
    )
    return [KeyRecord.from_row(r) for r in conn.execute(stmt)]


def find_active(conn: Connection, table: Table, owner: str, scope: str) -> KeyRecord | None:
    """The newest active key of ``scope`` for ``owner``, as ``conn`` sees it."""
    stmt = (
        select(table)
        .where(table.c.owner_table == owner, table.c.scope == scope, table.c.status == ACTIVE)
        .order_by(table.c.created_at.desc(), table.c.id.desc())
        .limit(1)
    )
    row = conn.execute(stmt).first()
    return KeyRecord.from_row(row) if row is not None else None


def get_record(conn: Connection, table: Table, key_id: int) -> KeyRecord | None:
    """The key row with this id, or ``None``."""
    row = conn.execute(select(table).where(table.c.id == key_id)).first()
    return KeyRecord.from_row(row) if row is not None else None


def insert_record(conn: Connection, table: Table, record: KeyRecord, *, if_absent: bool = False) -> bool:
    """Write a new key row on ``conn`` (inside the caller's transaction).

    With ``if_absent`` an id already taken is not an error: the insert does
    nothing and returns ``False`` (``ON CONFLICT DO NOTHING``, ``INSERT
    IGNORE``). PostgreSQL and InnoDB make it wait for a concurrent inserter
    of the same id to commit or roll back first, so ``False`` means the row
    is there, committed by another transaction.

    Whether our row went in is read back, not taken from ``rowcount``: before
    SQLAlchemy 2.0.28 (``preserve_rowcount``) psycopg reports -1 for it, and
    a loser that took -1 for "inserted" wrote values under key material that
    was never stored (issue 13).
    """
    now = record.created_at or utcnow()
    stmt = _insert(conn, table, if_absent)
    conn.execute(
        stmt.values(
            id=record.id,
            scope=record.scope,
            owner_table=record.owner_table,
            parent_id=record.parent_id,
            wrapping_key_id=record.wrapping_key_id,
            wrapped_key=record.wrapped_key,
            algorithm=record.algorithm,
            status=record.status,
            created_at=now,
            updated_at=now,
            context_version=record.context_version,
        )
    )
    if not if_absent:  # a plain INSERT either wrote the row or raised
        return True
    stored = conn.execute(select(table.c.wrapped_key).where(table.c.id == record.id)).scalar()
    return stored is not None and bytes(stored) == record.wrapped_key


def _insert(conn: Connection, table: Table, if_absent: bool) -> Any:
    name = conn.dialect.name
    if not if_absent:
        return table.insert()
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing(index_elements=[table.c.id])
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing(index_elements=[table.c.id])
    if name in ("mysql", "mariadb"):
        return table.insert().prefix_with("IGNORE")
    return table.insert()


def provider_wrapped(table: Table) -> Any:
    """Rows holding a key wrapped by a provider (not by a parent key, not shredded)."""
    return and_(table.c.parent_id.is_(None), table.c.wrapped_key.is_not(None))


def get_record_locked(conn: Connection, table: Table, key_id: int) -> KeyRecord | None:
    """Read the newest committed version of a key row (``FOR SHARE``), even
    where the transaction's snapshot predates it (InnoDB repeatable read)."""
    stmt = select(table).where(table.c.id == key_id)
    if conn.dialect.name != "sqlite":
        stmt = stmt.with_for_update(read=True)
    row = conn.execute(stmt).first()
    return KeyRecord.from_row(row) if row is not None else None


# -- querying: one deterministic / blind-index key per table ---------------------------

SINGLETON_SCOPES = frozenset({SCOPE_DETERMINISTIC, SCOPE_BLIND_INDEX})


def singleton_key_id(owner: str, scope: str) -> int:
    """The id of the *first* key of a scope that must have one key per table.

    Two transactions that each create the deterministic (or blind-index) key
    of a new table would otherwise commit two keys, and equal values written
    by each would stop comparing equal. With a fixed id the second insert
    collides on the primary key; inserted with ``if_absent`` it does nothing
    and its writer adopts the stored key (``KeyStore._adopt_winner``).
    """
    digest = hashlib.sha256(b"sa-envelope singleton key\x00" + scope.encode() + b"\x00" + owner.encode())
    return fmt.key_id_from(digest.digest())
