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
``BlindIndexType`` digests). Only plain Python values are expanded; a
self-comparison of the column, ``None`` and explicit bind parameters are
left as they are (an untyped ``bindparam()`` given its value at execution
is sealed under the write key only: see docs/rotation.md).
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import bindparam
from sqlalchemy.sql import operators as ops
from sqlalchemy.sql.elements import ClauseElement

__all__ = ["EXPANDED", "Sealed", "expand", "expanding"]

EXPANDED = frozenset({ops.eq, ops.ne, ops.in_op, ops.not_in_op})


class Sealed:
    """A query value paired with the live key it is to be sealed under."""

    __slots__ = ("key", "value")

    def __init__(self, value: Any, key: Any) -> None:
        self.value, self.key = value, key

    def __repr__(self) -> str:  # never the value
        return "Sealed(...)"


def _plain(value: Any) -> bool:
    return value is not None and not isinstance(value, ClauseElement) and not hasattr(value, "__clause_element__")


def expanding(type_: Any, values: list[Any], live: Callable[[], Any]) -> Any:
    """An expanding bind of ``type_`` whose elements are every value of
    ``values`` under every key ``live()`` returns, computed at execution."""
    frozen = list(values)

    def elements() -> list[Sealed]:
        keys = live()
        return [Sealed(v, k) for v in frozen for k in keys]

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
    if op in (ops.eq, ops.ne):
        if not _plain(operand):
            return None
        values = [operand]
    else:
        if not isinstance(operand, (list, tuple, set, frozenset)) or not all(_plain(v) for v in operand):
            return None
        values = list(operand)
    param = expanding(expr_type, values, live)
    return expr.in_(param) if op in (ops.eq, ops.in_op) else expr.not_in(param)
