"""How a token-table row names its indexed row: ``row_key``, from the primary key.

A one-column key is ``str(value)`` (``"17"``, ``"ab-3"``). A composite key
is every column, in key order, as ``<length>:<text>`` concatenated, where
``text`` is ``str(value)`` and ``length`` its length in characters
(``(17, "abc")`` -> ``"2:173:abc"``): unambiguous, and computable by SQL from
the row itself (:func:`sql`), which is how a lookup, a DELETE by criteria
and ``verify_index`` meet the tokens of a composite-key row. Composite key
columns are integers or strings, whose SQL text is Python's ``str()``.
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Column, Integer, String, cast, func, literal
from sqlalchemy.sql.elements import ColumnElement

from ..errors import ConfigurationError

__all__ = ["columns_of", "encode", "sql"]


def columns_of(index: Any) -> list[Column[Any]]:
    """The primary-key columns that key ``index``'s rows, checked once."""
    columns = list(index.table.primary_key.columns)
    if not columns:
        raise ConfigurationError(f"a search index needs a primary key; {index.owner} has none", table=index.owner)
    if len(columns) > 1:
        for column in columns:
            if not isinstance(column.type, (Integer, String)):
                raise ConfigurationError(
                    f"a search index in a token table keys composite primary keys of integer and string "
                    f"columns; {index.owner}.{column.name} is {column.type}",
                    table=index.owner,
                    column=index.column,
                )
    return columns


def encode(values: Sequence[Any]) -> str:
    """The ``row_key`` of a primary key's values (in key order)."""
    if len(values) == 1:
        return str(values[0])
    return "".join(f"{len(text)}:{text}" for text in map(str, values))


def sql(columns: Sequence[Any]) -> ColumnElement[Any]:
    """The same ``row_key``, as a SQL expression over ``columns``."""
    if len(columns) == 1:
        return cast(columns[0], String)
    parts: list[Any] = []
    for column in columns:
        text = cast(column, String)
        parts += [cast(func.char_length(text), String), literal(":"), text]
    return _concat(parts)


def _concat(parts: list[Any]) -> ColumnElement[Any]:
    out = parts[0]
    for part in parts[1:]:
        out = out.concat(part)
    return out  # type: ignore[no-any-return]
