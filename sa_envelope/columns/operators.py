"""Which SQL operators an encrypted column answers, and a clear error for the rest.

An encrypted column holds ciphertext, so the database compares ciphertext.
That gives the right answer for exactly two things:

* ``IS NULL`` / ``IS NOT NULL`` on any encrypted column (``None`` stays NULL);
* equality (``==``, ``!=``, ``in_``, ``not_in``, ``is_distinct_from``) on a
  ``deterministic=True`` column, where equal plaintexts give equal bytes,
  compared with Python values (encrypted on the way in) or with the same
  column (a self-join).

Everything else would be a wrong answer that looks right: ``<`` orders
ciphertexts, ``like`` matches bytes that are not text, ``==`` on a
randomised column never matches. :class:`EncryptedComparator` raises
:class:`UnsupportedQueryError` when such an expression is *built*;
:mod:`.guard` catches, when a statement is *executed*, what no operator
sees. This module knows no column type: it reads the attributes
(``deterministic``, ``bound_context``) of whatever type it serves.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql import operators as ops
from sqlalchemy.sql.elements import BindParameter, ClauseElement, ColumnClause, Null
from sqlalchemy.sql.selectable import Select
from sqlalchemy.types import NullType, TypeDecorator

from ..errors import UnsupportedQueryError
from . import migrating
from .livematch import is_expanded, over_live_keys
from .searchable import index_for

__all__ = ["EncryptedComparator", "check_comparison", "unsupported"]

EQUALITY = frozenset({ops.eq, ops.ne, ops.in_op, ops.not_in_op, ops.is_distinct_from, ops.is_not_distinct_from})
NULL_TESTS = frozenset({ops.is_, ops.is_not, ops.eq, ops.ne, ops.is_distinct_from, ops.is_not_distinct_from})
ORDERING = frozenset(
    {
        ops.lt,
        ops.le,
        ops.gt,
        ops.ge,
        ops.between_op,
        ops.not_between_op,
        ops.asc_op,
        ops.desc_op,
        ops.nulls_first_op,
        ops.nulls_last_op,
    }
)
PATTERN_NAMES = ("like", "contains", "startswith", "endswith", "match", "regexp")


def _where(expr_type: Any) -> tuple[str | None, str | None]:
    return getattr(expr_type, "_table", None), getattr(expr_type, "_column", None)


def _op_name(op: Any) -> str:
    return getattr(op, "__name__", None) or getattr(op, "opstring", None) or repr(op)


def unsupported(expr_type: Any, what: str, instead: str) -> UnsupportedQueryError:
    """The error for one column: what cannot work, and what to use."""
    table, column = _where(expr_type)
    place = f"{table}.{column}" if table else "an encrypted column"
    return UnsupportedQueryError(
        f"{what} on {place} cannot give a correct answer: the database only sees ciphertext. {instead}",
        table=table,
        column=column,
    )


def _advice(expr_type: Any, op: Any) -> tuple[str, str]:
    """(what was asked, what to do instead) for a refused operator."""
    name = _op_name(op)
    if op in ORDERING:
        return (
            f"ordering ({name})",
            "For ranges, declare a RangeIndex and use lookup(session, attr, between=(low, high)) "
            "or .matches_range(low, high); sort a bounded result in Python, or keep a "
            "plaintext column for the part you need to order by.",
        )
    if any(p in name for p in PATTERN_NAMES):
        return (
            f"pattern matching ({name})",
            "Use == on a deterministic=True column, a BlindIndex over a normalised "
            "value (sa_envelope.BlindIndexType, lookup()), or a PrefixIndex / SubstringIndex "
            "and lookup(session, attr, startswith=... | contains=...).",
        )
    if op in EQUALITY and not getattr(expr_type, "deterministic", False):
        return (
            f"equality ({name})",
            "This column is randomised (deterministic=False), so equal values have "
            "different ciphertexts and == would never match. Declare it "
            "EncryptedType(..., deterministic=True) or add a BlindIndexType column; "
            "only is_(None) / is_not(None) work here.",
        )
    return (
        f"operator {name}",
        "Encrypted columns support ==, !=, in_, not_in on "
        "deterministic=True columns, and is_(None) / is_not(None) on all.",
    )


def _is_null(value: Any) -> bool:
    return value is None or isinstance(value, Null)


def _same_column(expr_type: Any, element: Any) -> bool:
    """Another expression whose ciphertexts are comparable with ours."""
    other_context = getattr(getattr(element, "type", None), "bound_context", None)
    return (
        isinstance(element, ColumnClause)
        and other_context is not None
        and other_context == expr_type.bound_context
        and bool(getattr(element.type, "deterministic", False))
    )


def _is_itself(expr: Any, value: Any) -> bool:
    """The very same column (annotated or not): not an alias, not a copy."""
    if not isinstance(value, ColumnClause) or not isinstance(expr, ColumnClause):
        return False
    return value._deannotate() is expr._deannotate()


def _operand_ok(expr_type: Any, value: Any) -> bool:
    """Python values and bind parameters are encrypted as we encrypt; a SQL
    expression is only comparable if it is this same column (self-join)."""
    if hasattr(value, "__clause_element__"):  # ORM attributes, aliases
        value = value.__clause_element__()
    if isinstance(value, Select):
        cols = list(value.selected_columns)
        return len(cols) == 1 and _same_column(expr_type, cols[0])
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_operand_ok(expr_type, v) for v in value)
    if isinstance(value, BindParameter):
        # untyped: SQLAlchemy gives it the column's type, so it is encrypted;
        # typed otherwise (literal("x")): it would reach the database as plaintext
        other_context = getattr(value.type, "bound_context", None)
        return (
            isinstance(value.type, NullType)
            or value.type is expr_type
            or (other_context is not None and other_context == expr_type.bound_context)
        )
    if not isinstance(value, ClauseElement):
        return True
    return _same_column(expr_type, value)


def _column_pair(expr: Any, op: Any, other: tuple[Any, ...]) -> bool:
    """``==`` / ``!=`` between this column and another table column (not this one)."""
    if op not in (ops.eq, ops.ne) or len(other) != 1 or not isinstance(expr, ColumnClause):
        return False
    value = other[0]
    return isinstance(value, ColumnClause) and not _is_itself(expr, value) and value.table is not None


def check_comparison(expr: Any, op: Any, other: tuple[Any, ...]) -> None:
    """Raise unless ``expr`` (an expression of an encrypted type) may be
    compared by ``op`` with ``other``: the one rule, for expressions built
    with the column on the left (:class:`EncryptedComparator`) and on the
    right (:mod:`.comparisons`, at execution)."""
    expr_type = expr.type
    if op in NULL_TESTS and len(other) == 1 and _is_null(other[0]):
        return
    if op in (ops.eq, ops.ne) and len(other) == 1 and _is_itself(expr, other[0]):
        return  # SQLAlchemy's own dict lookups compare a column with itself
    if op in EQUALITY and getattr(expr_type, "deterministic", False):
        if not isinstance(expr, ColumnClause):
            raise unsupported(
                expr_type,
                f"comparing {type(expr).__name__}(...) of the column",
                "SQL functions see ciphertext; compare the column itself with ==.",
            )
        if not all(_operand_ok(expr_type, v) for v in other):
            raise unsupported(
                expr_type,
                "comparing with another column, a SQL expression or a typed literal()",
                "Equal values in different columns have different ciphertexts, and a "
                "typed literal is sent unencrypted; compare with plain Python values "
                "(or an untyped bindparam()), or with this same column.",
            )
        return
    if op is ops.distinct_op and getattr(expr_type, "deterministic", False):
        return
    what, instead = _advice(expr_type, op)
    raise unsupported(expr_type, what, instead)


class EncryptedComparator(TypeDecorator.Comparator[Any]):
    """Lets through only the operators that ciphertext answers correctly."""

    __slots__ = ()

    def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
        try:
            check_comparison(self.expr, op, other)
        except UnsupportedQueryError:
            if not _column_pair(self.expr, op, other):
                raise
            # column == column: SQLAlchemy's own ``column in [columns]`` tests build
            # these and take their truth; the same rule refuses it at execution
            # (comparisons.check_compiled), never silently skipped
            return super().operate(op, *other, **kwargs)
        if len(other) == 1 and (_is_itself(self.expr, other[0]) or is_expanded(other[0])):
            return super().operate(op, *other, **kwargs)  # itself, or a list expand() made: as it is

        def encrypted() -> Any:  # one ciphertext per live key (livematch), or refused while two are live
            return over_live_keys(
                self.expr, op, other, lambda: super(EncryptedComparator, self).operate(op, *other, **kwargs)
            )

        expanded = migrating.expand(self.expr, op, other, encrypted)  # an online migration: both halves
        return expanded if expanded is not None else encrypted()

    def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
        check_comparison(self.expr, op, (other,))
        return super().reverse_operate(op, other, **kwargs)

    # candidates from the column's search indexes (sa_envelope.search): re-check, or use lookup()

    def matches_prefix(self, text: str) -> Any:
        """Rows whose value may start with ``text`` (the column's PrefixIndex)."""
        return index_for(self.expr, "prefix").candidates(self.expr, text)

    def matches_substring(self, text: str) -> Any:
        """Rows whose value may contain ``text`` (the column's SubstringIndex)."""
        return index_for(self.expr, "substring").candidates(self.expr, text)

    def matches_range(self, low: Any, high: Any) -> Any:
        """Rows whose value may lie in ``low .. high``, inclusive (the column's RangeIndex)."""
        return index_for(self.expr, "range").candidates(self.expr, (low, high))
