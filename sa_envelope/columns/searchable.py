"""Which search indexes a table declares, for the column's own API.

The indexes themselves live above this layer (:mod:`sa_envelope.search`);
they register in ``Table.info`` when given to a table. The comparator's
``matches_prefix()`` / ``matches_substring()`` / ``matches_range()`` and
``lookup(..., startswith= | contains= | between=)`` find them here, by the
column and the kind asked for, without importing them.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError

__all__ = ["INFO_KEY", "index_for", "indexes_of"]

INFO_KEY = "sa_envelope_search"  # Table.info[INFO_KEY]: the table's search indexes
KIND_OF_QUERY = {"prefix": "startswith", "substring": "contains", "range": "between"}


def indexes_of(table: Any) -> list[Any]:
    """The search indexes declared on ``table`` (an alias's or annotated table's too)."""
    base = getattr(table, "element", table)  # an Alias names its table as .element
    base = base._deannotate() if hasattr(base, "_deannotate") else base
    info = getattr(base, "info", None)
    return list(info.get(INFO_KEY, ())) if isinstance(info, dict) else []


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
