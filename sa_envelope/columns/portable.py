"""Copies and pickles of a declaration, and the KeyManager they keep.

A KeyManager is a live resource (engines, a provider, plaintext keys in a
cache), not data, so the declarations that hold one (``EncryptedType``,
``BlindIndexType``, the search indexes) treat it apart from their state:

* ``copy.deepcopy`` (of a type, a table, a MetaData) shares the manager:
  the copy encrypts, reads and searches as the original does. Per-key and
  per-engine memos start empty in the copy.
* ``pickle`` carries no manager, so no key material: only the manager's
  process-local token (:mod:`sa_envelope.keys.registry`). Unpickled in the
  same process, the declaration finds the manager again; in another, it
  describes its column (names, scope, inner type) and refuses values with a
  :class:`~sa_envelope.errors.ConfigurationError` naming the table and
  column, until ``keys.adopt(metadata)`` (:func:`adopt`) attaches one.
* A source column's type carries its table's search indexes through both
  (they are registered by table, :mod:`.searchable`, not held by it), and
  each registers itself on its restored table.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import ConfigurationError
from ..keys import registry
from ..keys import table as kt
from .searchable import indexes_of, register, register_copy

__all__ = ["Portable", "adopt"]

_MEMOS = ("_vias", "_subkey")  # per engine / per key: ciphers, subkeys, bindings
_DROPPED = ("_codec", "_keys_token", "_search", "_followed")  # rebuilt (``_restored``), or travel in the state only


class Portable:
    """Mixin: ``keys`` shared by deepcopy, pickled as a token (see module doc)."""

    keys: Any

    def _plain_state(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in _DROPPED}
        for memo in _MEMOS:
            if memo in state:
                state[memo] = {}
        state["_search"] = self._carried_indexes()
        return state

    def _carried_indexes(self) -> list[Any]:
        """The search indexes of this column's table whose source it is."""
        parent = getattr(self, "_parent", None)
        table = getattr(parent, "table", None)
        if table is None:
            return []
        return [i for i in indexes_of(table) if i.table is table and table.c.get(i.source) is parent]

    def __getstate__(self) -> dict[str, Any]:
        state = self._plain_state()
        state["_keys_token"] = self.keys.pickle_token if self.keys is not None else self.__dict__.get("_keys_token")
        state["keys"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if state.get("keys") is None:
            state["keys"] = registry.find(state.get("_keys_token"))
        self._restore(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        if self.keys is not None:
            memo[id(self.keys)] = self.keys  # shared, not copied
        clone._restore(copy.deepcopy(self._plain_state(), memo))
        return clone

    def _restore(self, state: dict[str, Any]) -> None:
        search = state.pop("_search", None) or ()
        self.__dict__.update(state)
        self._restored()
        for index in search:  # restored with their own state (their table: the restored one)
            if index.table is not None and index not in indexes_of(index.table):
                register(index.table, index)
        if search:  # the restored column lost its listeners: this type's copies declare them (copied_to)
            self.__dict__["_followed"] = list(search)

    def __copy__(self) -> Any:
        """A shallow copy keeps the same KeyManager (and skips ``__getstate__``)."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def copied_to(self, table: Any) -> None:
        """A copy of this type attached to ``table`` (``Table.to_metadata`` of a
        restored table): the indexes restored with it are declared on the copy
        too, as the source column's listener does for an original."""
        for index in self.__dict__.get("_followed", ()):
            if index.table is not table:
                register_copy(table, index)

    def _restored(self) -> None:
        """Rebuild what the state does not carry (a type's codec)."""

    def missing_keys(self, where: tuple[str | None, str | None]) -> ConfigurationError | None:
        """The error of a declaration unpickled where its KeyManager is not."""
        if self.keys is not None or not self.__dict__.get("_keys_token"):
            return None
        table, column = where
        return ConfigurationError(
            f"{type(self).__name__} of {table}.{column} was unpickled in a process without its KeyManager "
            "(a pickle carries none, so no key material): attach one with keys.adopt(metadata)",
            table=table,
            column=column,
        )


def adopt(keys: Any, *targets: Any) -> int:
    """Give ``keys`` to every declaration in ``targets`` (MetaData or Table)
    that has no KeyManager: an unpickled MetaData's types and search indexes,
    or a DDL-only declaration. Returns how many were given it."""
    tables = [t for target in targets for t in getattr(target, "sorted_tables", [target])]
    count = 0
    for table in tables:
        held = [c.type for c in table.columns] + indexes_of(table)
        for item in held:
            if isinstance(item, Portable) and item.keys is None:
                item.keys = keys
                count += 1
                if getattr(item, "scope", None) == kt.SCOPE_ROW:
                    keys.use_row_scope()
    return count
