"""Writing key rows in bulk: the INSERT of new row keys and the shred of many.

Split from :mod:`.keys` (which decides *what* is written) because this is
only about *how fast* it reaches the database: a row-scoped INSERT of 20,000
rows writes 20,000 key rows, so the key rows must cost far less than the
rows they protect.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

from sqlalchemy import Connection, Table, text, update
from sqlalchemy.exc import DBAPIError

from ..envelope.ciphers import ROW_KEY_ALGORITHM
from ..faults import fault_point
from ..keys import table as kt

__all__ = ["COPY_MIN_ROWS", "IN_CHUNK", "VARYING", "insert_key_rows", "shared_values", "shred_many"]

COPY_MIN_ROWS = 100  # below this, a plain executemany is as fast as COPY
# Ids or digests per key-table query (``IN (...)``; ``= ANY(:array)`` on
# PostgreSQL), on every backend. Not more on PostgreSQL: with 1,000,000 row
# keys, 10,000 ids (1 %) a query made the planner choose a sequential scan
# of the whole key table (80-110 ms a query, analysed or not) where 1,000
# probe the primary key (2-6 ms).
IN_CHUNK = 1_000
MYSQL_CHUNK = 1_000  # key rows per multi-row INSERT (~300 bytes each, far below max_allowed_packet)


VARYING = ("id", "parent_id", "wrapped_key", "row_digest")  # what differs from one key row to the next


def shared_values(owner: str, now: Any) -> dict[str, Any]:
    """What every new row key of ``owner`` made at ``now`` has in common.
    ``owner`` as a plain ``str``: a table's name is SQLAlchemy's ``quoted_name``,
    a subclass that sqlite3 would try to adapt (a failed attribute lookup) once per row."""
    return {
        "scope": kt.SCOPE_ROW,
        "owner_table": str(owner),
        "wrapping_key_id": kt.PARENT,
        "algorithm": ROW_KEY_ALGORITHM,
        "status": kt.ACTIVE,
        "created_at": now,
        "updated_at": now,
    }


def insert_key_rows(conn: Connection, table: Table, shared: dict[str, Any], rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert key rows (``VARYING`` tuples, plus ``shared``) on ``conn``, in
    the caller's transaction. With psycopg 3, a COPY on the same DBAPI
    connection (binary where the key table's types allow; not through its
    async dialect, whose cursors SQLAlchemy adapts); with PyMySQL,
    multi-row INSERTs on it; elsewhere, from 100 rows, one DBAPI executemany
    whose shared values are converted once per batch, not once per row
    (SQLAlchemy's own executemany converts all eleven columns of every row:
    three times the cost)."""
    fault_point("rowkey.create.before_insert")
    if len(rows) < COPY_MIN_ROWS:
        conn.execute(table.insert(), [{**dict(zip(VARYING, row)), **shared} for row in rows])
    elif conn.dialect.driver == "psycopg" and not conn.dialect.is_async:  # psycopg_async says "psycopg" too
        _copy_rows(conn, table, shared, rows)
    elif conn.dialect.driver == "pymysql":
        _pymysql_rows(conn, table, shared, rows)
    else:
        _driver_rows(conn, table, shared, rows)
    fault_point("rowkey.create.after_insert")


def _copy_rows(conn: Connection, table: Table, shared: dict[str, Any], rows: Sequence[tuple[Any, ...]]) -> None:
    """psycopg: one COPY, in binary where the key table's column types are the
    ones :func:`_binary_types` knows (as ``create_table`` makes them): psycopg
    then packs ints and bytes instead of formatting every id, hex-escaping
    every wrap and digest and formatting both timestamps, once per key row
    (2,000 key rows: ~14.7 -> ~7.1 us each, server included). The same values
    are stored either way (tests/integration/test_bulk_key_rows.py)."""
    names = [*VARYING, *shared]
    tail = tuple(shared.values())
    quote = conn.dialect.identifier_preparer
    sql = f"COPY {quote.format_table(table)} ({', '.join(quote.quote(n) for n in names)}) FROM STDIN"
    types = _binary_types(conn, table, names)
    with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        with cursor.copy(sql if types is None else sql + " (FORMAT BINARY)") as copy:
            if types is not None:
                copy.set_types(types)
            write = copy.write_row
            for row in rows:
                write(row + tail)


# PostgreSQL's name of a column type (format_type) -> psycopg's binary type for it
_BINARY = {
    "bigint": "int8",
    "bytea": "bytea",
    "character varying": "varchar",
    "text": "text",
    "timestamp with time zone": "timestamptz",
}
_TYPES: weakref.WeakKeyDictionary[Any, dict[str, list[str] | None]] = weakref.WeakKeyDictionary()


def _binary_types(conn: Connection, table: Table, names: list[str]) -> list[str] | None:
    """The binary COPY types of ``names`` in the key table as the database
    has it, or ``None`` (text COPY) if any is not one a binary COPY of these
    values can fill (a key table made otherwise). Asked once per engine and
    table: a binary COPY into a column of another type would fail."""
    known = _TYPES.setdefault(conn.engine, {})
    name = conn.dialect.identifier_preparer.format_table(table)
    if name not in known:
        query = text(
            "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a"
            " WHERE a.attrelid = to_regclass(:t) AND a.attnum > 0 AND NOT a.attisdropped"
        )
        found: dict[str, str] = {r[0]: r[1] for r in conn.execute(query, {"t": name})}
        types = [_BINARY.get(found.get(n, "")) for n in names]
        known[name] = None if None in types else [t for t in types if t is not None]
    return known[name]


def _pymysql_rows(conn: Connection, table: Table, shared: dict[str, Any], rows: Sequence[tuple[Any, ...]]) -> None:
    """PyMySQL: multi-row INSERTs (``MYSQL_CHUNK`` rows each) built here, the
    shared values escaped once by the driver's own ``escape``. PyMySQL's
    executemany makes the same statements but escapes all eleven values of
    every row in Python."""
    raw: Any = conn.connection.driver_connection
    escape, dialect = raw.escape, conn.dialect
    varying = [table.c[name].type._cached_bind_processor(dialect) for name in VARYING]
    tail = "".join(", " + escape(_processed(table, dialect, k, v)) for k, v in shared.items()) + ")"
    quote = dialect.identifier_preparer
    names = ", ".join(quote.quote(n) for n in (*VARYING, *shared))
    prefix = f"INSERT INTO {quote.format_table(table)} ({names}) VALUES "
    base = dialect.loaded_dbapi.Error
    with raw.cursor() as cursor:
        for start in range(0, len(rows), MYSQL_CHUNK):
            values = []
            for row in rows[start : start + MYSQL_CHUNK]:
                items = [escape(v if p is None or v is None else p(v)) for p, v in zip(varying, row)]
                values.append("(" + ", ".join(items) + tail)
            try:
                cursor.execute(prefix + ", ".join(values))  # no arguments: PyMySQL formats nothing
            except base as exc:  # as SQLAlchemy would raise it (the key store names it)
                raise DBAPIError.instance(prefix + "...", None, exc, base) from exc


def _processed(table: Table, dialect: Any, name: str, value: Any) -> Any:
    """``value`` as column ``name``'s bind processor hands it to the driver."""
    process = table.c[name].type._cached_bind_processor(dialect)
    return value if process is None or value is None else process(value)


def _driver_rows(conn: Connection, table: Table, shared: dict[str, Any], rows: Sequence[tuple[Any, ...]]) -> None:
    names = [*VARYING, *shared]
    compiled = table.insert().compile(dialect=conn.dialect, column_keys=names)
    order = list(compiled.positiontup or ()) if compiled.positional else names
    template: list[Any] = []
    slots: list[tuple[int, int, Any]] = []  # (position in the statement, position in the row, processor)
    for pos, name in enumerate(order):
        process = _processor(table, conn.dialect, name)
        if name in shared:
            value = shared[name]
            template.append(value if process is None or value is None else process(value))
        else:
            template.append(None)
            slots.append((pos, VARYING.index(name), process))
    converted = []
    for row in rows:
        values = template.copy()
        for pos, index, process in slots:
            value = row[index]
            values[pos] = value if process is None or value is None else process(value)
        converted.append(tuple(values))
    params: Any = converted if compiled.positional else [dict(zip(order, values)) for values in converted]
    conn.exec_driver_sql(compiled.string, params)


def _processor(table: Table, dialect: Any, name: str) -> Any:
    """Column ``name``'s bind processor, but none for the wrap and the digest
    on pysqlite: SQLAlchemy wraps bytes in ``sqlite3.Binary`` (a
    ``memoryview``), which sqlite3 binds as the BLOB it binds the bytes as;
    two memoryviews and their buffers per key row were four more objects for
    the garbage collector."""
    if dialect.driver == "pysqlite" and name in ("wrapped_key", "row_digest"):
        return None
    return table.c[name].type._cached_bind_processor(dialect)


def shred_many(conn: Connection, table: Table, key_ids: Sequence[int], owner: str) -> None:
    """Destroy the material of these row keys of ``owner``: one UPDATE per
    1,000 ids, not one per key (a re-used primary key retires its old key on
    every new row of an INSERT)."""
    ids = list(dict.fromkeys(key_ids))
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        stmt = (
            update(table)
            .where(table.c.id.in_(chunk), table.c.scope == kt.SCOPE_ROW, table.c.owner_table == owner)
            .values(wrapped_key=None, status=kt.SHREDDED, updated_at=kt.utcnow())
        )
        fault_point("shred.before_update")
        conn.execute(stmt)
        fault_point("shred.after_update")
