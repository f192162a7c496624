"""How a column type learns the table and column it serves.

Both :class:`~sa_envelope.EncryptedType` and
:class:`~sa_envelope.BlindIndexType` bind their values to ``table.column``
(as associated data, or as the input of a derived key), so each must know
its names. They learn them when the column is attached to a table (the type
is a ``SchemaEventTarget``, as ``Enum`` is), or from ``context="table.column"``,
which pins them so that a rename does not orphan the stored values. A table
in a schema is named with it (``schema.table``): that name is the owner of
its keys and part of every value's associated data.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Table
from sqlalchemy.sql.base import SchemaEventTarget

from ..envelope import format as fmt
from ..errors import ConfigurationError
from .portable import Portable

__all__ = ["ColumnNames"]


class ColumnNames(Portable, SchemaEventTarget):
    """Mixin: ``_table``, ``_column`` and ``_ctx`` (the context bytes); copied
    and pickled as :mod:`.portable` says (the KeyManager shared, or a token)."""

    context: str | None

    def _init_names(self, context: str | None) -> None:
        """Call from ``__init__``: no names yet, or the pinned ones."""
        self.context = context
        self._table: str | None = None
        self._column: str | None = None
        self._ctx = b""
        self._parent: Column[Any] | None = None
        if context is not None:
            table, _, column = context.rpartition(".")
            if not table or not column:
                raise ConfigurationError(f"context must be 'table.column', got {context!r}")
            self._bind_names(table, column)

    def _set_parent(self, parent: Any, **kw: Any) -> None:
        """Called by ``Column`` when this type is given to it.

        One instance serves one column: its names are its identity. A copied
        column (mixins, ``to_metadata``) gets a copied type whose ``copy()``
        resets ``_parent``, so it re-learns the names of its new column.
        """
        if not isinstance(parent, Column):
            return
        if self._parent is not None and self._parent is not parent:
            raise ConfigurationError(
                f"one {type(self).__name__} instance is given to two columns "
                f"({self._parent.name!r} and {parent.name!r}); give each column its own instance"
            )
        self._parent = parent
        parent._on_table_attach(self._on_table_attach)

    def _on_table_attach(self, column: Column[Any], table: Table) -> None:
        # schema-qualified (``tenant_a.users``): tables of one name in two
        # schemas get keys and associated data of their own
        if self.context is None:
            self._bind_names(table.fullname, column.name)
        self.copied_to(table)

    def _bind_names(self, table: str, column: str) -> None:
        self._table, self._column = table, column
        self._ctx = fmt.context_bytes(table, column)

    @property
    def bound_context(self) -> str | None:
        """``table.column`` bound into every value, once known."""
        return f"{self._table}.{self._column}" if self._table else None
