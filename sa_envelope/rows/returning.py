"""``insert(t).returning(...)`` whose primary keys the database makes.

The rows' keys can only be bound once their primary keys are known, and
SQLAlchemy gives no ``inserted_primary_key`` for a statement with an
explicit ``returning()`` (nor compiles ``returning()`` together with
``return_defaults()``). So :func:`extend` appends the primary-key columns
the caller did not ask for to the RETURNING (sorted by parameter order for
an executemany, so that row *i* of the result is parameter set *i*), and
:func:`take_pks`, right after the statement ran (``after_execute``, before
the caller sees the result), reads the rows, hands them back to the result
(``CursorResult._rewind``, as SQLAlchemy does for ``return_defaults(
supplemental_cols=...)``) and narrows the result to the caller's columns:
the caller gets exactly the RETURNING they asked for, decrypted.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import CursorResult

from .specs import TableSpec
from .writeplan import PASS_PK, refused

__all__ = ["Returned", "extend", "take_pks"]

Returned = tuple[int, list[int]]  # the caller's column count, the primary key's result positions


def _supported() -> bool:
    """The result internals :func:`take_pks` uses (SQLAlchemy 2.0 and 2.1 have them)."""
    return hasattr(CursorResult, "_rewind") and hasattr(CursorResult, "_reset_memoizations")


def extend(conn: Connection, stmt: Any, spec: TableSpec, executemany: bool) -> tuple[Any, Returned]:
    """``stmt`` returning its primary key too, and where to find it."""
    if not _supported() or (executemany and not conn.dialect.insert_executemany_returning_sort_by_parameter_order):
        raise refused(
            spec, f"an executemany INSERT ... RETURNING on {conn.dialect.name} without the primary keys", PASS_PK
        )
    asked = list(stmt._all_selected_columns)  # returning(t) / returning(Model): each of their columns
    positions: list[int] = []
    extra: list[Any] = []
    for column in spec.pk_cols:
        found = next((i for i, c in enumerate(asked) if _same(c, column)), None)
        if found is None:
            found = len(asked) + len(extra)
            extra.append(column)
        positions.append(found)
    if extra or (executemany and not stmt._sort_by_parameter_order):
        stmt = stmt.returning(*extra, sort_by_parameter_order=executemany or stmt._sort_by_parameter_order)
    return stmt, (len(asked), positions)


def _same(element: Any, column: Any) -> bool:
    deannotate = getattr(element, "_deannotate", None)
    return deannotate is not None and deannotate() is column


def take_pks(result: Any, returned: Returned) -> list[tuple[Any, ...]]:
    """The primary key of each returned row; the result keeps the rows and
    shows only the caller's columns."""
    count, positions = returned
    rows = result.fetchall()
    result._rewind(rows)
    if len(result.keys()) != count:
        result._metadata = result._metadata._reduce(list(range(count)))
        result._reset_memoizations()
    return [tuple(row[i] for i in positions) for row in rows]
