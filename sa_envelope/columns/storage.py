"""How an encrypted column is stored on each backend, and how long its values get.

An envelope is bytes: ``BYTEA`` on PostgreSQL, ``BLOB`` on SQLite. MySQL and
MariaDB can only index a bounded ``VARBINARY`` (a ``LONGBLOB`` has no index
without a prefix length), so where the inner type bounds the value (a
``String(n)``, or a fixed-size codec of a deterministic column, which is the
one users index and query) the column gets ``VARBINARY`` of the longest
envelope; anything longer or unbounded is a ``LONGBLOB``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import LargeBinary
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import String, TypeDecorator, TypeEngine

from ..envelope import format as fmt

__all__ = [
    "CODEC_MAX_BYTES",
    "MYSQL_VARBINARY_MAX",
    "UTF8_MAX_BYTES",
    "bytes_processor",
    "dialect_impl",
    "max_stored_length",
]

MYSQL_VARBINARY_MAX = 3072  # InnoDB's longest index key: beyond it, LONGBLOB
UTF8_MAX_BYTES = 4
# Longest encoding of the fixed-size codecs (see envelope.codecs), so that
# deterministic (queryable, indexable) columns of these types get a bounded
# VARBINARY on MySQL/MariaDB too (times allow a UTC offset with seconds and
# microseconds: "+HH:MM:SS.ffffff").
CODEC_MAX_BYTES = {"int": 20, "uuid": 16, "uuid-str": 16, "bool": 1, "date": 10, "datetime": 42, "time": 31}


def dialect_impl(dialect: Dialect, limit: int | None) -> TypeEngine[Any]:
    """BYTEA on PostgreSQL, VARBINARY(limit) or LONGBLOB on MySQL, BLOB elsewhere."""
    if dialect.name == "postgresql":
        return dialect.type_descriptor(postgresql.BYTEA())
    if dialect.name in ("mysql", "mariadb"):
        if limit is not None and limit <= MYSQL_VARBINARY_MAX:
            return dialect.type_descriptor(mysql.VARBINARY(limit))
        return dialect.type_descriptor(mysql.LONGBLOB())
    return dialect.type_descriptor(LargeBinary())


def bytes_processor(dialect: Dialect, processor: Any) -> Any:
    """The storage type's bind ``processor``, or ``None`` where the driver
    takes the envelope's ``bytes`` as they are: its ``Binary`` is
    ``memoryview`` (sqlite3, aiosqlite: SQLAlchemy's own note says sqlite3
    needs no conversion) or returns the very object it is given (PyMySQL's
    ``bytes(x)``). The stored bytes are the same; the per-value call and the
    wrapper object are not made. Any other driver keeps its ``Binary``
    (psycopg's picks the binary protocol, pg8000's marks ``bytea``)."""
    binary = getattr(getattr(dialect, "dbapi", None), "Binary", None)
    if processor is None or binary is None:
        return processor
    if binary is memoryview:
        return None
    probe = b"\x00sa-envelope"
    try:
        same = binary(probe) is probe
    except Exception:
        same = False
    return None if same else processor


def max_stored_length(inner: Any, codec_name: str, deterministic: bool) -> int | None:
    """Largest stored value in bytes, where the inner type bounds it: the
    encoded value plus the mode's overhead (``fmt.SIV_OVERHEAD`` for
    deterministic columns, ``fmt.GCM_OVERHEAD`` otherwise)."""
    overhead = fmt.SIV_OVERHEAD if deterministic else fmt.GCM_OVERHEAD
    while isinstance(inner, TypeDecorator):  # a decorator stores what its impl stores
        inner = inner.impl_instance
    length: int | None = getattr(inner, "length", None)
    if isinstance(inner, String) and length:
        return length * UTF8_MAX_BYTES + overhead
    fixed = CODEC_MAX_BYTES.get(codec_name) if deterministic else None
    return fixed + overhead if fixed is not None else None
