"""Equality during a rotation: one comparison, one ciphertext per live key.

While a deterministic or blind-index key is being rotated (``keys.live``),
equal values are stored under two keys, as two different byte strings. So
``col == v`` is sent as ``col IN (v under each live key)`` and ``col != v``
as ``NOT IN``; ``in_``/``not_in`` expand each value likewise. The list is a
``bindparam(expanding=True)`` whose value is computed *when the statement
executes* (``callable_``), from the live set cached by the process: a
statement built once and run after a rotation still matches both keys, and
once the old key is retired the list is back to one ciphertext.

Each element is a :class:`Sealed`: the value and the key to seal it under,
which the type's bind processor honours (``EncryptedType.encrypt``,
``BlindIndexType`` digests). ``is_not_distinct_from(v)`` expands like
``IS NOT NULL AND IN`` and ``is_distinct_from(v)`` like ``IS NULL OR NOT
IN``: never NULL, as the operators they stand for, so ``NOT`` of them is exact.

What cannot expand is refused rather than answered with the write key's
rows only (docs/querying.md: no query silently returns wrong rows): an
explicit ``bindparam()`` (its value is known only as the statement runs,
one parameter, one ciphertext) and a comparison with another column of the
same ciphertexts (a self-join: equal values under two keys differ) are
sent with :func:`one_key`, a clause that is true while the column has one
live key and raises :class:`~sa_envelope.UnsupportedQueryError` when the
statement executes while it has more. ``GROUP BY`` and ``DISTINCT`` are
checked the same way when the statement executes (:mod:`.guard`).
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import Integer, and_, bindparam, literal_column, null, or_
from sqlalchemy.sql import operators as ops
from sqlalchemy.sql.elements import BinaryExpression, ClauseElement, Null

from ..errors import UnsupportedQueryError

__all__ = ["EXPANDED", "Sealed", "check_one_key", "expand", "expanding", "is_expanded", "one_key", "over_live_keys"]

EXPANDED = frozenset({ops.eq, ops.ne, ops.in_op, ops.not_in_op, ops.is_distinct_from, ops.is_not_distinct_from})


class Sealed:
    """A query value paired with the live key it is to be sealed under."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any, key: Any) -> None:
        self.value, self.key = value, key

    def __repr__(self) -> str:  # never the value
        return "Sealed(...)"


_LIVE = "_sa_envelope_live_keys"


def _plain(value: Any) -> bool:
    return value is not None and not isinstance(value, ClauseElement) and not hasattr(value, "__clause_element__")


def expanding(type_: Any, values: list[Any], live: Callable[[], Any]) -> Any:
    """An expanding bind of ``type_`` whose elements are every value of
    ``values`` under every key ``live()`` returns, computed at execution."""
    frozen = list(values)

    def elements() -> list[Sealed]:
        keys = live()
        return [Sealed(v, k) for v in frozen for k in keys]

    setattr(elements, _LIVE, True)  # already over every live key: not guarded again
    return bindparam(None, callable_=elements, expanding=True, type_=type_)


def expand(expr: Any, op: Any, other: tuple[Any, ...]) -> Any:
    """``expr op other`` rewritten over every live key, or ``None`` to leave it.

    ``expr``'s type supplies ``live_keys()`` (the keys a query matches);
    types without it are never expanded.
    """
    expr_type = expr.type
    live = getattr(expr_type, "live_keys", None)
    if op not in EXPANDED or live is None or not getattr(expr_type, "deterministic", True) or len(other) != 1:
        return None
    operand = other[0]
    if op in (ops.eq, ops.ne, ops.is_distinct_from, ops.is_not_distinct_from):
        if not _plain(operand):
            return None
        values = [operand]
    else:
        if not isinstance(operand, (list, tuple, set, frozenset)) or not all(_plain(v) for v in operand):
            return None
        values = list(operand)
    param = expanding(expr_type, values, live)
    # IS [NOT] DISTINCT FROM is never NULL (a NULL row is distinct from any value), IN is: guarded by
    # IS [NOT] NULL so that NOT of it stays exact; built directly, as ``expr.is_(None)`` on a
    # migrating column would expand into both halves
    if op is ops.is_distinct_from:
        return or_(BinaryExpression(expr, null(), ops.is_), expr.not_in(param))
    if op is ops.is_not_distinct_from:
        return and_(BinaryExpression(expr, null(), ops.is_not), expr.in_(param))
    return expr.in_(param) if op in (ops.eq, ops.in_op) else expr.not_in(param)


def check_one_key(expr_type: Any, what: str) -> None:
    """Raise if ``expr_type``'s column has more than one live key now (the
    statement executing is ``what``, which cannot be expanded over them)."""
    if getattr(expr_type, "keys", None) is None or not getattr(expr_type, "deterministic", False):
        return
    live = expr_type.live_keys()
    if len(live) > 1:
        table, column = getattr(expr_type, "_table", None), getattr(expr_type, "_column", None)
        raise UnsupportedQueryError(
            f"{what} on {table}.{column} cannot give a correct answer while its key is being rotated "
            f"({len(live)} live keys: equal values are stored as different ciphertexts). Compare with plain "
            "Python values (== v, in_([...]), expanded over every live key), or run it once the "
            "re-encryption has retired the old key (docs/rotation.md)",
            table=table,
            column=column,
        )


def one_key(expr_type: Any, what: str) -> Any:
    """A clause that is true whenever the statement runs with one live key
    and raises (:func:`check_one_key`) when it runs with more: its parameter
    is computed at execution, as the expanded lists are."""

    def value() -> int:
        check_one_key(expr_type, what)
        return 1

    return bindparam(None, callable_=value, type_=Integer) == literal_column("1")


def is_expanded(operand: Any) -> bool:
    """``operand`` is one of this module's lists (already over every live key)."""
    return bool(getattr(getattr(operand, "callable", None), _LIVE, False))


def _unexpanded(operand: Any) -> bool:
    """An operand this module could not expand and that is not NULL."""
    if isinstance(operand, (list, tuple, set, frozenset)):
        return any(_unexpanded(v) for v in operand)
    if is_expanded(operand):
        return False
    return not (_plain(operand) or operand is None or isinstance(operand, Null))


def over_live_keys(expr: Any, op: Any, other: tuple[Any, ...], direct: Callable[[], Any]) -> Any:
    """``expr op other`` over every live key: expanded (:func:`expand`), or
    ``direct()`` guarded by :func:`one_key` where it cannot be, or
    ``direct()`` alone where keys do not matter (``IS NULL``, a type
    without live keys)."""
    expanded = expand(expr, op, other)
    if expanded is not None:
        return expanded
    expr_type = expr.type
    if (
        op in EXPANDED
        and getattr(expr_type, "live_keys", None) is not None
        and getattr(expr_type, "deterministic", False)
        and any(_unexpanded(v) for v in other)
    ):
        return and_(
            direct(),
            one_key(expr_type, f"a comparison ({getattr(op, '__name__', op)}) with a bind parameter or another column"),
        )
    return direct()
