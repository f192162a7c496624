"""Which search indexes a table declares, for the column's own API.

The indexes themselves live above this layer (:mod:`sa_envelope.search`);
they register here (:func:`register`) when given to a table: not in
``Table.info``, which Alembic autogenerate renders into migrations with
``repr``. The comparator's
``matches_prefix()`` / ``matches_substring()`` / ``matches_range()`` and
``lookup(..., startswith= | contains= | between=)`` find them here, by the
column and the kind asked for, without importing them.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..errors import ConfigurationError

__all__ = ["index_for", "indexes_of", "register"]

_declared: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()  # Table -> its search indexes


def register(table: Any, index: Any) -> None:
    """Add ``index`` to ``table``'s search indexes."""
    _declared.setdefault(table, []).append(index)


KIND_OF_QUERY = {"prefix": "startswith", "substring": "contains", "range": "between"}


def indexes_of(table: Any) -> list[Any]:
    """The search indexes declared on ``table`` (an alias's or annotated table's too)."""
    base = getattr(table, "element", table)  # an Alias names its table as .element
    base = base._deannotate() if hasattr(base, "_deannotate") else base
    try:
        return list(_declared.get(base, ()))
    except TypeError:  # not weakly referenceable: not a table
        return []


def index_for(expr: Any, kind: str) -> Any:
    """The ``kind`` index ("prefix", "substring", "range") over column ``expr``."""
    if hasattr(expr, "__clause_element__"):
        expr = expr.__clause_element__()
    table = getattr(expr, "table", None)
    for index in indexes_of(table):
        if index.kind == kind and index.source == expr.key:
            return index
    name = f"{getattr(table, 'name', '?')}.{getattr(expr, 'key', '?')}"
    raise ConfigurationError(
        f"{name} has no {kind} index, so {KIND_OF_QUERY[kind]}= cannot be answered; declare one "
        f"in the table's arguments (sa_envelope.{kind.capitalize()}Index)",
        column=getattr(expr, "key", None),
    )
