"""The token table: the stored form of every search index.

One row per (indexed table, index, row, token)::

    owner    the indexed table (schema-qualified, as key owners are)
    name     the index: "<column>/<kind>" (``name/prefix``, ``notes/substring``)
    row_key  the indexed row's primary key, as text (:mod:`.rowkeys`: composite keys too)
    token    a keyed digest truncated to the index's bits, as a signed BIGINT

The primary key ``(owner, name, token, row_key)`` is the table's clustered
order (an InnoDB primary key, a SQLite ``WITHOUT ROWID`` table): each token
is one B-tree entry, and a lookup reads only that tree. ``(owner, row_key)``
finds a row's tokens when it changes. The table is plain metadata beside the
key table: ``keys.create_table()`` and the Alembic ``create_key_table``
operation create both. A table of the first shape (no primary key, a
``..._lookup`` index instead) keeps working; ``op.upgrade_search_table()``
moves it to this one (docs/format.md).

A token is the keyed digest (:mod:`.prf`: AES-256 on one block, or BLAKE2b
for a longer input) of one token input, its first eight bytes read as a
signed big-endian integer and shifted right to keep ``bits`` bits. The
subkey is derived from the table's blind-index key with a context that names
the index kind, table, column and settings (docs/format.md). On PostgreSQL
the tokens of a row live in its own table instead (:mod:`.arrays`).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Iterator, Sequence

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    and_,
    delete,
    text,
)

__all__ = [
    "TOKEN_TABLE_NAME",
    "delete_row_tokens",
    "derive_context",
    "insert_tokens",
    "token_table",
    "token_table_name",
]

TOKEN_TABLE_NAME = "sa_envelope_search"
_U16 = struct.Struct(">H")
# 0xffff first: never the u16 table-name length a BlindIndexType's context starts with
_CONTEXT_LABEL = b"\xff\xffsa-envelope search v2\x00"  # v1: one HMAC per token
_CHUNK = 500
_MYSQL_ROWS = 5000  # entries per multi-row INSERT: ~0.4 MB, under any max_allowed_packet


def token_table_name(key_table_name: str) -> str:
    """``sa_envelope_keys`` -> ``sa_envelope_search``; ``x`` -> ``x_search``."""
    return key_table_name.removesuffix("_keys") + "_search"


def token_table(metadata: MetaData, key_table_name: str = "sa_envelope_keys") -> Table:
    """Define the token table on ``metadata`` (or return it if already there)."""
    name = token_table_name(key_table_name)
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name,
        metadata,
        Column("owner", String(190), nullable=False),
        Column("name", String(100), nullable=False),
        Column("row_key", String(100), nullable=False),
        Column("token", BigInteger, nullable=False),
        PrimaryKeyConstraint("owner", "name", "token", "row_key", name=f"pk_{name}"),
        Index(f"ix_{name}_row", "owner", "row_key"),
        sqlite_with_rowid=False,
    )


def _field(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def derive_context(kind: str, table: str, column: str, settings: str) -> bytes:
    """The subkey context of one index: kind, table, column and settings,
    each length-prefixed, so no two indexes share a subkey."""
    parts = (kind, table, column, settings)
    return _CONTEXT_LABEL + b"".join(_field(p.encode("utf-8")) for p in parts)


Entry = tuple[str, str, int]  # (name, row_key, token) of one owner


def insert_tokens(conn: Connection, tokens: Table, owner: str, entries: Sequence[Entry]) -> None:
    """Insert ``owner``'s token entries on ``conn`` (the writing statement's transaction).

    Sent straight to the DBAPI connection under ``conn`` (a value of 136
    n-grams is 136 entries: SQLAlchemy's per-row compilation and checks
    cost more than the database's insert), in row order (one row's entries
    are neighbours in the ``(owner, row_key)`` index; sorting by token
    measured slower on InnoDB and on SQLite). An entry already there is
    skipped (``OR IGNORE`` / ``ON CONFLICT DO NOTHING``; MariaDB: ``ON
    DUPLICATE KEY UPDATE`` of nothing, which unlike ``INSERT IGNORE`` keeps
    strict mode's errors): it is the token wanted. On PostgreSQL, one
    ``INSERT ... SELECT FROM unnest(arrays)`` per chunk: psycopg's
    executemany sends a statement per row, ~20 times slower. On MariaDB,
    multi-row INSERTs written here (:func:`_mysql_values`)."""
    if not entries:
        return
    owner = str(owner)  # not the table's quoted_name: sqlite3 asks every str subclass for __conform__
    table = conn.dialect.identifier_preparer.format_table(tokens)
    columns = "(owner, name, row_key, token)"
    if conn.dialect.name == "postgresql":
        _insert_unnest(conn, table, columns, owner, entries)
        return
    values = ", ".join(["?" if conn.dialect.paramstyle == "qmark" else "%s"] * 4)
    if conn.dialect.name == "sqlite":
        sql = f"INSERT OR IGNORE INTO {table} {columns} VALUES ({values})"
    else:
        sql = f"INSERT INTO {table} {columns} VALUES ({values}) ON DUPLICATE KEY UPDATE token = token"
    dbapi = conn.connection.dbapi_connection
    cursor = dbapi.cursor()  # type: ignore[union-attr]
    try:
        if conn.dialect.driver == "pymysql":  # as rows/keyrows tells PyMySQL
            head, _, tail = sql.partition(f"({values})")
            for statement in _mysql_values(dbapi, head, tail, owner, entries):
                cursor.execute(statement)
            return
        for start in range(0, len(entries), _CHUNK * 100):
            cursor.executemany(sql, [(owner, n, r, t) for n, r, t in entries[start : start + _CHUNK * 100]])
    finally:
        cursor.close()


def _insert_unnest(conn: Connection, table: str, columns: str, owner: str, entries: Sequence[Entry]) -> None:
    statement = text(  # text(): every PostgreSQL driver's paramstyle (asyncpg's $1)
        f"INSERT INTO {table} {columns} SELECT :o, * FROM unnest(CAST(:n AS varchar[]), "
        "CAST(:r AS varchar[]), CAST(:t AS bigint[])) ON CONFLICT DO NOTHING"
    )
    for start in range(0, len(entries), _CHUNK * 100):
        chunk = entries[start : start + _CHUNK * 100]
        conn.execute(
            statement, {"o": owner, "n": [e[0] for e in chunk], "r": [e[1] for e in chunk], "t": [e[2] for e in chunk]}
        )


def _mysql_values(dbapi: Any, head: str, tail: str, owner: str, entries: Sequence[Entry]) -> Iterator[bytes]:
    """PyMySQL: ``head (..), (..) tail`` statements of :data:`_MYSQL_ROWS`
    entries each, the strings quoted by PyMySQL's own ``escape()`` (as its
    executemany does, for the connection's charset and SQL mode), once per
    owner, index and row key, the tokens written as integers (``%d``:
    nothing else formats). PyMySQL's executemany builds the same statements
    but escapes four parameters per entry in Python. Other drivers keep
    their executemany."""
    encoding = dbapi.encoding

    def quote(value: str) -> bytes:
        return dbapi.escape(value).encode(encoding)  # type: ignore[no-any-return]

    owner_sql = b"(" + quote(owner) + b", "
    start_sql, end_sql = head.encode(encoding), tail.encode(encoding)
    prefixes: dict[tuple[str, str], bytes] = {}
    for start in range(0, len(entries), _MYSQL_ROWS):
        rows = []
        for name, row_key, token in entries[start : start + _MYSQL_ROWS]:
            prefix = prefixes.get((name, row_key))
            if prefix is None:
                prefix = prefixes[(name, row_key)] = owner_sql + quote(name) + b", " + quote(row_key) + b", "
            rows.append(prefix + b"%d)" % token)
        yield start_sql + b", ".join(rows) + end_sql


def delete_row_tokens(
    conn: Connection, tokens: Table, owner: str, names: Iterable[str], row_keys: Sequence[str]
) -> None:
    """Delete the tokens of ``names`` for the rows ``row_keys`` of ``owner``."""
    names = list(names)
    for start in range(0, len(row_keys), _CHUNK):
        chunk = list(row_keys[start : start + _CHUNK])
        conn.execute(
            delete(tokens).where(and_(tokens.c.owner == owner, tokens.c.row_key.in_(chunk), tokens.c.name.in_(names)))
        )
