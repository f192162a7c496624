"""A row-scoped value on its way to the database, paired with its row's key.

The bind processor of a row-scoped column sees one value, never its row, so
the row's key has to travel with the value: the ORM hooks
(:mod:`sa_envelope.rows.orm`) and Core users (:class:`RowKey`, from
``KeyManager.new_row_keys``) hand the column a :class:`RowValue`. A bare
value raises :class:`~sa_envelope.RowKeyRequiredError`, so nothing is ever
sealed under a key that was not inserted in the same transaction.
"""

from __future__ import annotations

from typing import Any

from ..envelope import format as fmt
from ..keys.cache import CachedKey

__all__ = ["RowKey", "RowValue"]


class RowValue:
    """A value to store in a row-scoped column, with the row key to seal it.

    The ORM hooks put these in the flush parameters; Core users get them from
    :meth:`RowKey.value`. Never stored, never shown: repr hides the value.
    """

    __slots__ = ("value", "key")

    def __init__(self, value: Any, key: CachedKey) -> None:
        self.value = value
        self.key = key

    def __repr__(self) -> str:
        return f"RowValue(<hidden>, key={fmt.format_key_id(self.key.key_id)})"


class RowKey:
    """A row key already inserted in the caller's transaction (Core API)."""

    __slots__ = ("_key", "owner")

    def __init__(self, key: CachedKey, owner: str) -> None:
        self._key = key
        self.owner = owner

    @property
    def key_id(self) -> int:
        return self._key.key_id

    def value(self, value: Any) -> RowValue | None:
        """Wrap ``value`` for a row-scoped column of this row (``None`` stays NULL)."""
        return None if value is None else RowValue(value, self._key)

    def __repr__(self) -> str:
        return f"RowKey({fmt.format_key_id(self.key_id)}, owner={self.owner!r})"
