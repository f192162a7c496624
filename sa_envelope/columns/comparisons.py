"""Comparisons with an encrypted column on the *right*, or between an
encrypted column and another column, refused at execution.

``EncryptedComparator`` judges every comparison built with the encrypted
column on the left. One built the other way round (``plain_col == enc_col``,
as a join or a relationship on an encrypted foreign key writes it) goes
through the plain column's comparator, which knows nothing of ciphertext:
the database would compare plaintext with ciphertext and silently return no
rows. :func:`check_compiled` walks each compiled statement once (the result
is remembered per compiled object, so a cached statement costs a set
lookup) and applies the comparator's own rule, :func:`.check_comparison`,
to every such comparison, and to ``enc_col == other_col`` (which the
comparator lets through unjudged, because SQLAlchemy itself builds such
comparisons to test ``column in [columns]``): it works where that rule allows it (a
deterministic column against itself) and raises ``UnsupportedQueryError``
otherwise.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BinaryExpression, ColumnClause

from .encrypted import EncryptedType
from .operators import check_comparison

__all__ = ["check_compiled"]

_checked: weakref.WeakSet[Any] = weakref.WeakSet()


def _encrypted(element: Any) -> bool:
    return isinstance(getattr(element, "type", None), EncryptedType)


def check_compiled(compiled: Any) -> None:
    """Raise for a comparison the database would answer wrongly (once per compiled statement)."""
    if compiled is None or compiled in _checked:
        return
    statement = getattr(compiled, "statement", None)
    if statement is not None:
        for element in visitors.iterate(statement):
            if not isinstance(element, BinaryExpression):
                continue
            if _encrypted(element.right) and not _encrypted(element.left):
                check_comparison(element.right, element.operator, (element.left,))
            elif _encrypted(element.left) and isinstance(element.right, ColumnClause):
                check_comparison(element.left, element.operator, (element.right,))  # left to execution (operators)
    _checked.add(compiled)
