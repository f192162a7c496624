"""Writing key rows in bulk: the INSERT of new row keys and the shred of many.

Split from :mod:`.keys` (which decides *what* is written) because this is
only about *how fast* it reaches the database: a row-scoped INSERT of 20,000
rows writes 20,000 key rows, so the key rows must cost far less than the
rows they protect.
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Connection, Table, update

from ..faults import fault_point
from ..keys import table as kt

__all__ = ["COPY_MIN_ROWS", "insert_key_rows", "shred_many"]

COPY_MIN_ROWS = 100  # below this, a plain executemany is as fast as COPY
IN_CHUNK = 1_000


def insert_key_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """One executemany on ``conn`` (the caller's transaction). With psycopg 3,
    a COPY on the same DBAPI connection; elsewhere, from 100 rows, the DBAPI's
    executemany with the values converted as SQLAlchemy converts them, each
    value shared by the rows (timestamps, scope, owner) once per batch instead
    of once per row: the key rows cost a third of SQLAlchemy's own executemany."""
    fault_point("rowkey.create.before_insert")
    if len(rows) < COPY_MIN_ROWS:
        conn.execute(table.insert(), rows)
    elif conn.dialect.driver == "psycopg":
        _copy_rows(conn, table, rows)
    else:
        _driver_rows(conn, table, rows)
    fault_point("rowkey.create.after_insert")


def _copy_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    names = list(rows[0])
    quote = conn.dialect.identifier_preparer
    sql = f"COPY {quote.format_table(table)} ({', '.join(quote.quote(n) for n in names)}) FROM STDIN"
    with conn.connection.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
        with cursor.copy(sql) as copy:
            write = copy.write_row
            for row in rows:
                write(list(row.values()))  # every row dict is built with the same key order


def _driver_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    names = list(rows[0])
    compiled = table.insert().compile(dialect=conn.dialect, column_keys=names)
    order = list(compiled.positiontup or ()) if compiled.positional else names
    columns = []
    for name in order:
        process = table.c[name].type._cached_bind_processor(conn.dialect)
        first = rows[0][name]
        columns.append((name, process, first, process(first) if process is not None else first))
    converted = [
        tuple(row[n] if p is None else (pf if row[n] is f else p(row[n])) for n, p, f, pf in columns) for row in rows
    ]
    params: Any = converted if compiled.positional else [dict(zip(order, values)) for values in converted]
    conn.exec_driver_sql(compiled.string, params)


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
