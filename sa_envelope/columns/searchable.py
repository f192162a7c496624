"""Which search indexes a table declares, for the column's own API.

The indexes themselves live above this layer (:mod:`sa_envelope.search`);
they register here (:func:`register`) when given to a table: not in
``Table.info``, which Alembic autogenerate renders into migrations with
``repr``. The comparator's
``matches_prefix()`` / ``matches_substring()`` / ``matches_range()`` and
``lookup(..., startswith= | contains= | between=)`` find them here, by the
column and the kind asked for, without importing them.

A copy of an indexed table (``Table.to_metadata``, ``Table.tometadata``, a
column copied into another table) is told about its indexes when its copy
of the source column attaches (:func:`register_copy`), and each index is
declared again on the copy when the copy is first asked for its indexes:
by then the copy has every column, the copied token column of array
storage too (:meth:`SearchIndex.copy_to <sa_envelope.search.SearchIndex.copy_to>`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from ..errors import ConfigurationError

__all__ = ["declared_on", "index_for", "indexes_of", "register", "register_copy"]

_declared: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()  # Table -> its search indexes
_copied: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()  # Table -> indexes it copies
_copying = threading.RLock()  # a write racing the first lookup sees every copy, or waits for it


def register(table: Any, index: Any) -> None:
    """Add ``index`` to ``table``'s search indexes."""
    _declared.setdefault(table, []).append(index)


def register_copy(table: Any, index: Any) -> None:
    """Record that ``table`` copies a column ``index`` indexes: ``index``
    is declared again on ``table`` (``index.copy_to(table)``) when first asked."""
    _copied.setdefault(table, []).append(index)


def declared_on(table: Any) -> list[Any]:
    """The indexes declared on ``table`` itself so far (no copies made)."""
    return list(_declared.get(table, ()))


KIND_OF_QUERY = {"prefix": "startswith", "substring": "contains", "range": "between"}


def indexes_of(table: Any) -> list[Any]:
    """The search indexes declared on ``table`` (an alias's or annotated table's too)."""
    base = getattr(table, "element", table)  # an Alias names its table as .element
    base = base._deannotate() if hasattr(base, "_deannotate") else base
    try:
        copied = base in _copied
    except TypeError:  # not weakly referenceable: not a table
        return []
    if copied:
        _declare_copies(base)
    return list(_declared.get(base, ()))


def _declare_copies(table: Any) -> None:
    with _copying:  # dropped only once declared: a racing reader waits here
        for index in _copied.get(table, ()):
            index.copy_to(table)
        _copied.pop(table, None)


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
