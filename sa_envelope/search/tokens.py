"""The token table: the stored form of every search index.

One row per (indexed table, index, row, token)::

    owner    the indexed table (schema-qualified, as key owners are)
    name     the index: "<column>/<kind>" (``name/prefix``, ``notes/substring``)
    row_key  the indexed row's primary key, as text (:mod:`.rowkeys`: composite keys too)
    token    a keyed digest truncated to the index's bits, as a signed BIGINT

The composite index ``(owner, name, token, row_key)`` answers a lookup from
the index alone; ``(owner, row_key)`` finds a row's tokens when it changes.
The table is plain metadata beside the key table: ``keys.create_table()``
and the Alembic ``create_key_table`` operation create both.

A token is the keyed digest (:mod:`.prf`: AES-256 on one block, or BLAKE2b
for a longer input) of one token input, its first eight bytes read as a
signed big-endian integer and shifted right to keep ``bits`` bits. The
subkey is derived from the table's blind-index key with a context that names
the index kind, table, column and settings (docs/format.md). On PostgreSQL
the tokens of a row live in its own table instead (:mod:`.arrays`).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Sequence

from sqlalchemy import BigInteger, Column, Connection, Index, MetaData, String, Table, and_, delete, insert, text

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
        Index(f"ix_{name}_lookup", "owner", "name", "token", "row_key"),
        Index(f"ix_{name}_row", "owner", "row_key"),
    )


def _field(data: bytes) -> bytes:
    return _U16.pack(len(data)) + data


def derive_context(kind: str, table: str, column: str, settings: str) -> bytes:
    """The subkey context of one index: kind, table, column and settings,
    each length-prefixed, so no two indexes share a subkey."""
    parts = (kind, table, column, settings)
    return _CONTEXT_LABEL + b"".join(_field(p.encode("utf-8")) for p in parts)


def insert_tokens(conn: Connection, tokens: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert token rows on ``conn`` (the writing statement's transaction).

    On PostgreSQL, one ``INSERT ... SELECT FROM unnest(arrays)`` per chunk:
    psycopg's executemany sends a statement per row, ~20 times slower."""
    if conn.dialect.name == "postgresql" and rows:
        statement = text(
            f"INSERT INTO {conn.dialect.identifier_preparer.format_table(tokens)} (owner, name, row_key, token) "
            "SELECT * FROM unnest(CAST(:o AS varchar[]), CAST(:n AS varchar[]), CAST(:r AS varchar[]), "
            "CAST(:t AS bigint[]))"
        )
        for start in range(0, len(rows), _CHUNK * 100):
            chunk = rows[start : start + _CHUNK * 100]
            columns = {
                k: [r[c] for r in chunk] for k, c in (("o", "owner"), ("n", "name"), ("r", "row_key"), ("t", "token"))
            }
            conn.execute(statement, columns)
        return
    for start in range(0, len(rows), _CHUNK * 10):
        conn.execute(insert(tokens), list(rows[start : start + _CHUNK * 10]))


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
