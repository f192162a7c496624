"""Which bound engine's keys a column's processors use (:mod:`sa_envelope.keys.engines`).

SQLAlchemy builds a type's bind and result processors once per dialect, and
each Engine has a dialect of its own: so the engine a statement runs on is
known when its processors are built, and the per-value path gains nothing.
A column keeps one :class:`Via` per bound engine: that engine's store, its
row keys and the read memo of its keys (two databases may hold keys of the
same id, so one memo for both could open a value copied from one database
with the other's key).

A processor built for a dialect whose engine is not bound refuses every
value with :class:`~sa_envelope.ConfigurationError` naming the engine, and
looks again on each value, so an engine bound later is served from then on
(``bind()`` also drops the processors SQLAlchemy cached before). ``unbind()``
drops a column's state for the engine (:func:`_forget`) with the processors.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from ..errors import EncryptionError
from ..keys.engines import Binding
from ..keys.store import KeyStore

__all__ = ["Via", "late_bind_processor", "late_result_processor", "not_bound", "require", "via"]


class Via:
    """One column's state for one bound engine."""

    __slots__ = ("binding", "memo", "store")

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.store: KeyStore = binding.store
        self.memo: dict[bytes, list[Any]] = {}  # header -> [opener, epoch, key]: .fastpath


def via(column_type: Any, dialect: Any) -> Via | None:
    """``column_type``'s state for the engine of ``dialect``; ``None`` when
    that engine is not bound (or the type has no KeyManager)."""
    keys = column_type.keys
    binding = keys.engines.get(dialect) if keys is not None else None
    if binding is None:
        return None
    found: Via | None = column_type._vias.get(binding)
    if found is None:
        found = column_type._vias[binding] = Via(binding)
        binding.on_close(functools.partial(_forget, weakref.ref(column_type), binding))
    return found


def _forget(column_ref: weakref.ref[Any], binding: Binding) -> None:
    """``binding`` was unbound: the column drops its state for it (the read memo)."""
    column_type = column_ref()
    found = column_type._vias.pop(binding, None) if column_type is not None else None
    if found is not None:
        found.memo.clear()


def require(column_type: Any, dialect: Any) -> Via:
    """:func:`via`, or the error naming the engine that is not bound."""
    found = via(column_type, dialect)
    if found is None:
        raise not_bound(column_type, dialect)
    return found


def not_bound(column_type: Any, dialect: Any) -> Exception:
    """Why a value of ``column_type`` cannot be processed on ``dialect``."""
    keys = column_type.keys
    if keys is None or column_type._table is None:
        return column_type._unbound(EncryptionError)  # type: ignore[no-any-return]
    return keys.engines.not_bound(dialect)  # type: ignore[no-any-return]


def late_bind_processor(column_type: Any, dialect: Any, impl: Any) -> Any:
    """A bind processor for an engine not bound when it was built."""

    def process(value: Any) -> Any:
        if value is None:
            return None
        found = via(column_type, dialect)
        try:
            if found is None:
                raise not_bound(column_type, dialect)
            data = column_type.encrypt(value, found.store)
        except BaseException:
            value = None  # no plaintext in the traceback's frames
            raise
        return data if impl is None else impl(data)

    return process


def late_result_processor(column_type: Any, dialect: Any, impl: Any) -> Any:
    """A result processor for an engine not bound when it was built."""

    def process(value: Any) -> Any:
        if impl is not None:
            value = impl(value)
        if value is None:
            return None
        found = via(column_type, dialect)
        if found is None:
            raise not_bound(column_type, dialect)
        return column_type.decrypt(value, found)

    return process
