"""Key ids and row digests sent to PostgreSQL as one binary array parameter.

The key-row queries match many rows with one ``= ANY(:array)`` parameter:
up to 1,000 key ids per query for a cold read or a stream's partition
(:meth:`.keys.RowKeys.load`), one row digest per row of an INSERT (the keys
earlier rows with these primary keys left, :func:`.binding.find_bound`).
psycopg 3 dumps a ``%s`` list with its *text* list dumper: every id formatted,
every digest hex-escaped and quoted, then parsed by the server; its binary
list dumper packs them as ``int8[]`` / ``bytea[]`` (10,000 items, psycopg
3.3 C implementation: 3.1 -> 0.9 us an id, 8.1 -> 1.1 us a digest, query
included; benchmarks/README.md). The parameter keeps its type (``int8[]``,
``bytea[]``), so the server plans the query as before.

How: the parameter's value is a :class:`BinaryArray` (a ``list``), for
which :func:`prepare` registers psycopg's ``ListBinaryDumper`` on the DBAPI
connection the query runs on (its own adapters, once per connection: nothing
process-wide). A connection it was not registered on still dumps the list,
in text, as before. Other drivers get SQLAlchemy's ``ARRAY`` as before.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import BigInteger, Connection, LargeBinary, bindparam
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import TypeDecorator

__all__ = ["BinaryArray", "array_param", "prepare"]

PSYCOPG = ("psycopg", "psycopg_async")
_ITEMS = {"bigint": BigInteger, "bytea": LargeBinary}
_READY: weakref.WeakSet[Any] = weakref.WeakSet()  # DBAPI connections with the dumper registered


class BinaryArray(list):  # type: ignore[type-arg]
    """A list psycopg dumps with its binary list dumper (see :func:`prepare`)."""

    __slots__ = ()


class _BinaryArrayType(TypeDecorator[Any]):
    """``ARRAY`` of ``bigint`` or ``bytea`` whose value reaches psycopg as a
    :class:`BinaryArray`, items untouched (ints and bytes are what psycopg
    dumps; SQLAlchemy's ``ARRAY`` would copy the list item by item)."""

    impl = ARRAY(BigInteger)
    cache_ok = True

    def __init__(self, item: str) -> None:
        super().__init__()
        self.item = item
        self.impl = ARRAY(_ITEMS[item])

    def bind_processor(self, dialect: Any) -> Any:
        return BinaryArray


def array_param(conn: Connection, name: str, item: str, value: Any = None) -> Any:
    """The ``= ANY()`` parameter ``name`` of ``item`` (``"bigint"`` or
    ``"bytea"``) for ``conn``'s driver: binary on psycopg, else SQLAlchemy's ``ARRAY``."""
    kind: Any = _BinaryArrayType(item) if conn.dialect.driver in PSYCOPG else ARRAY(_ITEMS[item])
    return bindparam(name, value, type_=kind)


def prepare(conn: Connection) -> None:
    """Register the binary list dumper for :class:`BinaryArray` on the
    psycopg connection behind ``conn`` (once per DBAPI connection)."""
    if conn.dialect.driver not in PSYCOPG:
        return
    raw = conn.connection.driver_connection
    if raw is None or raw in _READY:
        return
    from psycopg.types.array import ListBinaryDumper

    raw.adapters.register_dumper(BinaryArray, ListBinaryDumper)
    _READY.add(raw)
