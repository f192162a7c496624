"""Refuse a value the ORM is about to write before SQLAlchemy sees it.

A value its column's codec cannot encode (``10**400`` for a ``Float``,
``Decimal("sNaN")``, a ``str`` for an ``Integer``) fails in the bind
processor, deep inside the flush. Our :class:`~sa_envelope.EncryptionError`
reaches the caller unwrapped there too, but the flush's own frames hold the
statement's parameters: every other value of the row, in plaintext, for any
error tracker that captures frame locals. So ``before_flush`` checks each
value to be written with :meth:`EncryptedType.check_value` first, and
refuses it from frames that hold instances and attribute names only.

SQL expressions assigned to attributes are left to the execution guard
(:mod:`.guard`), which refuses them with ``UnsupportedQueryError``.
"""

from __future__ import annotations

import weakref
from itertools import chain
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.sql.elements import ClauseElement

from ..errors import EncryptionError
from .encrypted import EncryptedType

__all__ = ["install"]

_ATTRS: weakref.WeakKeyDictionary[Mapper[Any], tuple[tuple[str, EncryptedType], ...]] = weakref.WeakKeyDictionary()
_installed = False


def install() -> None:
    """Listen on every Session (idempotent; costs nothing for models without
    encrypted columns)."""
    global _installed
    if not _installed:
        event.listen(Session, "before_flush", _check_pending)
        _installed = True


def _encrypted_attrs(mapper: Mapper[Any]) -> tuple[tuple[str, EncryptedType], ...]:
    found = _ATTRS.get(mapper)
    if found is None:
        found = _ATTRS[mapper] = tuple(
            (prop.key, prop.columns[0].type)
            for prop in mapper.column_attrs
            if isinstance(prop.columns[0].type, EncryptedType)
        )
    return found


def _reason(column_type: EncryptedType, value: Any) -> str | None:
    """Why the value cannot be written (``None``: it can, or it is not ours to check)."""
    if value is None or isinstance(value, ClauseElement):
        return None
    return column_type.check_value(value)


def _check_pending(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    """Check the values new and changed instances are about to write."""
    for obj in chain(session.new, session.dirty):
        state = orm_attributes.instance_state(obj)
        persistent = state.key is not None
        for attr, column_type in _encrypted_attrs(state.mapper):
            if persistent and attr not in state.committed_state:
                continue
            reason = _reason(column_type, state.dict.get(attr))
            if reason is not None:
                raise EncryptionError(reason, table=column_type._table, column=column_type._column)
