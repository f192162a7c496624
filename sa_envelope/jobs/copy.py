"""Filling one column from another in batches: the data half of encrypting
(or decrypting) an existing column in place.

The Alembic operations in :mod:`sa_envelope.alembic` add a temporary column,
call :func:`copy_column` to fill it, then drop the old column and rename the
new one. Rows are picked by "source set, target still empty", so a batch
that committed is never redone and a crashed run resumes where it stopped.
Each batch is one transaction (the runner's) on the key store's engine,
with values bound through the tracker's ``use_connection``, so a key
created for them is stored in that same transaction.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import Connection, MetaData, Table, and_, bindparam, func, select, update

from ..errors import ConfigurationError
from ..faults import fault_point
from ..keys.store import KeyStore
from .runner import run_batches

__all__ = ["copy_column"]


def _reflect(engine: Any, name: str) -> Table:
    table = Table(name, MetaData(), autoload_with=engine)
    if not table.primary_key.columns:
        raise ConfigurationError(f"table {name} has no primary key: cannot convert it in batches")
    return table


def copy_column(
    store: KeyStore,
    table_name: str,
    source: str,
    target: str,
    transform: Callable[[Any], Any],
    *,
    job: str,
    batch_size: int = 500,
    progress: bool | None = None,
) -> int:
    """Set ``target = transform(source)`` where source is set and target is not.

    ``job`` names the work (``encrypt_column``, ``decrypt_column``): the
    progress bar and the fault points of :mod:`sa_envelope.faults`.
    """
    engine = store.engine
    table = _reflect(engine, table_name)
    pk = list(table.primary_key.columns)
    src, dst = table.c[source], table.c[target]
    todo = and_(src.is_not(None), dst.is_(None))
    stmt = (
        update(table)
        .where(*(c == bindparam(f"_pk{i}") for i, c in enumerate(pk)))
        .values({target: bindparam("_value", type_=dst.type)})
    )
    pick = select(*pk, src).where(todo).order_by(*pk).limit(batch_size)

    def batch(conn: Connection) -> int:
        with store.tracker.use_connection(conn):
            rows = conn.execute(pick).all()
            if not rows:
                return 0
            params = [{**{f"_pk{i}": row[i] for i in range(len(pk))}, "_value": transform(row[-1])} for row in rows]
            fault_point(f"{job}.batch.before_update")
            conn.execute(stmt, params)
            fault_point(f"{job}.batch.after_update")
        return len(rows)

    with engine.connect() as conn:
        total = int(conn.execute(select(func.count()).select_from(table).where(todo)).scalar_one())
    return run_batches(engine, job, batch, total=total, desc=f"{job} {table_name}.{source}", progress=progress)
