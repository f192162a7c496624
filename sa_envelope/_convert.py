"""Filling one column from another in batches: the data half of encrypting
(or decrypting) an existing column in place.

The Alembic operations in :mod:`sa_envelope.alembic` add a temporary column,
call :func:`copy_column` to fill it, then drop the old column and rename the
new one. Rows are picked by "source set, target still empty", so a batch
that committed is never redone and a crashed run resumes where it stopped.
Each batch is one transaction on the key manager's engine, with values
bound through :meth:`KeyManager.use_connection`, so a key created for them
is stored in that same transaction.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from sqlalchemy import MetaData, Table, and_, bindparam, func, select, update

from ._errors import ConfigurationError
from ._progress import progress_bar

__all__ = ["copy_column"]


def _points(points: Mapping[str, Callable[[], None]] | None) -> Callable[[str], None]:
    def point(step: str) -> None:
        if points is not None:
            points[step]()

    return point


def _reflect(engine: Any, name: str) -> Table:
    table = Table(name, MetaData(), autoload_with=engine)
    if not table.primary_key.columns:
        raise ConfigurationError(f"table {name} has no primary key: cannot convert it in batches")
    return table


def copy_column(
    keys: Any,
    table_name: str,
    source: str,
    target: str,
    transform: Callable[[Any], Any],
    *,
    batch_size: int = 500,
    progress: bool | None = None,
    label: str = "convert",
    points: Mapping[str, Callable[[], None]] | None = None,
) -> int:
    """Set ``target = transform(source)`` where source is set and target is not.

    ``points``: the caller's fault points (``before_update``, ``after_update``,
    ``after_commit``), each a call of ``fault_point`` with a literal name.
    """
    point = _points(points)
    engine = keys.engine
    table = _reflect(engine, table_name)
    pk = list(table.primary_key.columns)
    src, dst = table.c[source], table.c[target]
    todo = and_(src.is_not(None), dst.is_(None))
    stmt = (
        update(table)
        .where(*(c == bindparam(f"_pk{i}") for i, c in enumerate(pk)))
        .values({target: bindparam("_value", type_=dst.type)})
    )
    with engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(table).where(todo)).scalar_one())
    done = 0
    with progress_bar(total, f"{label} {table_name}.{source}", progress) as bar:
        while True:
            with engine.begin() as conn, keys.use_connection(conn):
                rows = conn.execute(select(*pk, src).where(todo).order_by(*pk).limit(batch_size)).all()
                if not rows:
                    break
                params = [
                    {**{f"_pk{i}": row[i] for i in range(len(pk))}, "_value": transform(row[-1])}
                    for row in rows
                ]
                point("before_update")
                conn.execute(stmt, params)
                point("after_update")
            point("after_commit")
            done += len(rows)
            bar.update(len(rows))
    return done
