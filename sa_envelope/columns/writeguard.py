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
parameters typed with this column's own :class:`EncryptedType`. In the SET
of an upsert (``on_conflict_do_update(set_=...)``, ``on_duplicate_key_update``)
also the proposed row's value of the *same* column (``stmt.excluded.col``,
``stmt.inserted.col``: rendered ``VALUES(col)`` on MariaDB), which copies a
ciphertext sealed for that very column; the proposed value of another column
is refused, since it would not decrypt there. Row-scoped columns have a
further rule (the key must be the row's): :mod:`sa_envelope.rows.upserts`.
"""

from __future__ import annotations

from typing import Any, Iterator

from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null
from sqlalchemy.sql.selectable import FromClause

from ..errors import UnsupportedQueryError
from .encrypted import EncryptedType

__all__ = ["check_writes", "is_proposed", "upsert_assignments"]


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


def upsert_assignments(stmt: Any) -> list[tuple[Any, Any]]:
    """``(key, value)`` of the SET of an upsert (PostgreSQL and SQLite
    ``on_conflict_do_update``, MySQL ``on_duplicate_key_update``); empty otherwise."""
    clause = getattr(stmt, "_post_values_clause", None)
    sets = getattr(clause, "update_values_to_set", None)  # a dict in SQLAlchemy 2.1, pairs in 2.0
    if sets is None:
        sets = getattr(clause, "update", None)
    if not sets:
        return []
    return list(sets.items() if isinstance(sets, dict) else sets)


def is_proposed(value: Any, table: Any, key: str) -> bool:
    """``value`` is the proposed row's value of column ``key`` of ``table``
    (``excluded.key`` / ``inserted.key``, an alias of the table itself)."""
    source = getattr(getattr(value, "table", None), "element", None)
    if getattr(value, "key", None) != key or source is None or not hasattr(source, "_deannotate"):
        return False
    return bool(source._deannotate() is table._deannotate())


def _column(table: Any, key: Any) -> Any:
    if isinstance(key, str):
        return table.c.get(key)
    return key


def check_writes(stmt: Any, params: Any = None) -> None:
    """Refuse an INSERT/UPDATE that writes anything but a value of the
    column's own type into an encrypted column. ``params`` (the first
    parameter set) tells which columns a SQL default would fill."""
    table: Any = getattr(stmt, "table", None)
    columns = getattr(table, "c", None)
    if columns is None or not any(isinstance(c.type, EncryptedType) for c in columns):
        return
    _check_sql_defaults(stmt, table, params or {})
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
    for key, value in upsert_assignments(stmt):
        column = _column(table, key)
        column_type = getattr(column, "type", None)
        if isinstance(column_type, EncryptedType) and not (
            _allowed(value, column_type) or is_proposed(value, table, column.key)
        ):
            proposed = isinstance(getattr(getattr(value, "table", None), "element", None), FromClause)
            what, value = _kind(value), None
            raise _refused(table, column, f"{what} (in the upsert's SET)", _OTHER_COLUMN if proposed else _UNENCRYPTED)


def _check_sql_defaults(stmt: Any, table: Any, params: Any) -> None:
    """A SQL-expression ``default`` / ``onupdate`` (``default=func.now()``) of
    an encrypted column is rendered into the statement: plaintext, stored."""
    given = {getattr(_column(table, k), "key", None) for k, _ in _assignments(stmt)} | set(params)
    for column in table.c:
        default = column.onupdate if getattr(stmt, "is_update", False) else column.default
        sql = default is not None and (default.is_clause_element or default.is_sequence)
        if sql and isinstance(column.type, EncryptedType) and column.key not in given:
            raise _refused(
                table,
                column,
                "SQL default (Column default=/onupdate= a SQL expression)",
                "which would store it unencrypted; give the column a Python default (a value or a function) instead",
            )


def _kind(value: Any) -> str:
    if isinstance(getattr(getattr(value, "table", None), "element", None), FromClause):
        return f"proposed value of the column {value.key}"
    if isinstance(value, BindParameter):
        return f"parameter of type {type(value.type).__name__}"
    return type(value).__name__


_OTHER_COLUMN = (
    "where it was sealed for another column and would not decrypt; set the same column's "
    "proposed value (stmt.excluded.col, stmt.inserted.col) or a Python value"
)
_UNENCRYPTED = "which would store it unencrypted; pass the Python value instead (it is encrypted by the column's type)"


def _refused(table: Any, column: Any, what: str, why: str = _UNENCRYPTED) -> UnsupportedQueryError:
    name = getattr(column, "name", str(column))
    return UnsupportedQueryError(
        f"this statement writes a {what} into the encrypted column {table.name}.{name}, {why}",
        table=table.name,
        column=name,
    )
