"""Statements refused when they are executed: what no operator sees.

:class:`~.operators.EncryptedComparator` refuses wrong *expressions* when
they are built. Some wrong answers are built from clauses no operator
touches: ``ORDER BY`` an encrypted column, ``GROUP BY`` a randomised one,
``min()``/``max()``/``sum()``/``avg()`` of one, ``GROUP BY``/``DISTINCT``
on a deterministic one while its key is being rotated (equal values under
two keys would be two groups: :func:`.livematch.check_one_key`), INSERT/UPDATE statements
that would write past the encryption (:mod:`.writeguard`: a literal, a SQL
function, a cast, another column) and those that would leave a blind index
stale. :func:`check_statement` runs before
every statement on a KeyManager's engine and raises
:class:`~sa_envelope.UnsupportedQueryError` for those.
"""

from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy.sql import operators as ops
from sqlalchemy.sql.elements import Label, UnaryExpression
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Select

from .blindindex import check_index_writes
from .encrypted import EncryptedType
from .livematch import check_one_key
from .operators import unsupported
from .writeguard import check_writes

__all__ = ["check_statement"]

AGGREGATES = frozenset({"max", "min", "sum", "avg"})


def _encrypted_type(element: Any) -> Any:
    """The EncryptedType of a column expression, or None."""
    while isinstance(element, (Label, UnaryExpression)):
        element = element.element
    element_type = getattr(element, "type", None)
    return element_type if isinstance(element_type, EncryptedType) else None


def _check_select(stmt: Select[Any] | CompoundSelect[Any]) -> None:
    for clause in stmt._order_by_clauses:
        found = _encrypted_type(clause)
        if found is not None:
            raise unsupported(
                found,
                "ORDER BY",
                "Ciphertext order is meaningless. Bound the result (a filter, a RangeIndex lookup "
                "between=(low, high), .limit(n)), then sort it in Python: "
                "sorted(rows, key=lambda row: row.<column>); or order by a plaintext column.",
            )
    if isinstance(stmt, CompoundSelect):
        return
    for clause in stmt._group_by_clauses:
        found = _encrypted_type(clause)
        if found is not None and not found.deterministic:
            raise unsupported(
                found,
                "GROUP BY",
                "A randomised column puts every row in a group of its own; group by "
                "a deterministic=True column or in Python.",
            )
        if found is not None:
            check_one_key(found, "GROUP BY")
    _check_distinct(stmt)
    for raw in stmt._raw_columns:
        _check_function(raw)


def _distinct_of(element: Any) -> Any:
    """The EncryptedType under ``col.distinct()`` (maybe labelled), or None."""
    while isinstance(element, Label):
        element = element.element
    if isinstance(element, UnaryExpression) and element.operator is ops.distinct_op:
        return _encrypted_type(element.element)
    return None


def _check_distinct(stmt: Select[Any]) -> None:
    """``SELECT DISTINCT``, ``DISTINCT ON`` and ``col.distinct()`` (also in a
    function: ``count(col.distinct())``) during a rotation of the column."""
    distinct: list[Any] = list(getattr(stmt, "_distinct_on", ()))
    if stmt._distinct and not distinct:
        distinct = list(stmt.selected_columns)
    for column in distinct:
        found = _encrypted_type(column)
        if found is not None:
            check_one_key(found, "DISTINCT")
    for raw in stmt._raw_columns:
        while isinstance(raw, Label):
            raw = raw.element
        for element in [raw, *(raw.clauses if isinstance(raw, FunctionElement) else ())]:
            found = _distinct_of(element)
            if found is not None:
                check_one_key(found, "DISTINCT")


def _check_function(element: Any) -> None:
    while isinstance(element, Label):
        element = element.element
    if isinstance(element, FunctionElement) and element.name.lower() in AGGREGATES:
        for arg in element.clauses:
            found = _encrypted_type(arg)
            if found is not None:
                raise unsupported(
                    found,
                    f"{element.name}()",
                    "The database would aggregate ciphertexts, not values; load the "
                    "values and aggregate in Python (min(), max(), sum()).",
                )


def check_statement(stmt: Any, multiparams: Any = (), params: Any = None, *_: Any) -> None:
    """Refuse, before it runs, a statement that would answer wrongly.

    Looks at the top-level SELECT (or each SELECT of a UNION) only: the
    clauses users write by hand. Cheap: no traversal of the whole tree.
    An INSERT or UPDATE is checked for values that would bypass the
    encryption and for blind indexes it would leave stale.
    """
    if getattr(stmt, "is_dml", False):
        if getattr(stmt, "is_insert", False) or getattr(stmt, "is_update", False):
            first = multiparams[0] if multiparams else params
            check_writes(stmt, first if hasattr(first, "keys") else None)
        check_index_writes(stmt, multiparams, params)
        return
    if isinstance(stmt, CompoundSelect):
        _check_select(stmt)
        selects: Iterable[Any] = stmt.selects
    else:
        selects = (stmt,)
    for select in selects:
        if isinstance(select, Select):
            _check_select(select)
