"""INSERT and UPDATE statements that would write past the encryption.

An encrypted column is encrypted by its bind processor, which runs only for
a bind parameter of the column's own type. Anything else written into it
reaches the database as is: ``values(note=literal(x))`` (a parameter typed
``String``), ``func.upper(x)``, ``cast(x, String)``, another column,
``text()`` or an ``INSERT ... FROM SELECT``. SQLite and MariaDB store that
plaintext in the encrypted column; PostgreSQL refuses it in an error that
quotes it. :func:`check_writes` refuses such a statement before it runs,
with :class:`~sa_envelope.UnsupportedQueryError`, on every backend.

Allowed: plain Python values (bound with the column's type), ``None`` and
``null()``, untyped ``bindparam()`` (it takes the column's type), and bind
parameters typed with this column's own :class:`EncryptedType`.
"""

from __future__ import annotations

from typing import Any, Iterator

from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null

from ..errors import UnsupportedQueryError
from .encrypted import EncryptedType

__all__ = ["check_writes"]


def _same_column_type(bound: Any, column_type: EncryptedType) -> bool:
    """A bind typed for this very column (a per-dialect copy counts)."""
    return bound is column_type or (
        isinstance(bound, EncryptedType)
        and bound._ctx == column_type._ctx
        and bound.scope == column_type.scope
        and bound.deterministic == column_type.deterministic
    )


def _allowed(value: Any, column_type: EncryptedType) -> bool:
    if not isinstance(value, ClauseElement) or isinstance(value, Null):
        return True  # a Python value (multi-values): bound with the column's type
    if isinstance(value, BindParameter):
        return bool(value.type._isnull) or _same_column_type(value.type, column_type)
    return False


def _assignments(stmt: Any) -> Iterator[tuple[Any, Any]]:
    """``(key, value)`` of every column the statement's ``values()`` set."""
    ordered = getattr(stmt, "_ordered_values", None)  # SQLAlchemy 2.0's ordered_values()
    yield from ordered or ()
    yield from (stmt._values or {}).items()
    for rows in stmt._multi_values:
        for row in rows:
            if isinstance(row, dict):
                yield from row.items()


def _column(table: Any, key: Any) -> Any:
    if isinstance(key, str):
        return table.c.get(key)
    return key


def check_writes(stmt: Any) -> None:
    """Refuse an INSERT/UPDATE that writes anything but a value of the
    column's own type into an encrypted column."""
    table: Any = getattr(stmt, "table", None)
    columns = getattr(table, "c", None)
    if columns is None or not any(isinstance(c.type, EncryptedType) for c in columns):
        return
    select = getattr(stmt, "select", None)
    if select is not None:  # INSERT ... FROM SELECT
        for name in getattr(stmt, "_select_names", None) or ():
            column = _column(table, name)
            if column is not None and isinstance(column.type, EncryptedType):
                raise _refused(table, column, "INSERT ... FROM SELECT")
    for key, value in _assignments(stmt):
        column = _column(table, key)
        column_type = getattr(column, "type", None)
        if isinstance(column_type, EncryptedType) and not _allowed(value, column_type):
            what, value = _kind(value), None  # the frame keeps no plaintext
            raise _refused(table, column, what)


def _kind(value: Any) -> str:
    if isinstance(value, BindParameter):
        return f"parameter of type {type(value.type).__name__}"
    return type(value).__name__


def _refused(table: Any, column: Any, what: str) -> UnsupportedQueryError:
    name = getattr(column, "name", str(column))
    return UnsupportedQueryError(
        f"this statement writes a {what} into the encrypted column {table.name}.{name}, "
        "which would store it unencrypted; pass the Python value instead (it is "
        "encrypted by the column's type)",
        table=table.name,
        column=name,
    )
