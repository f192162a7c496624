"""Which keys a search index's tokens are made under, and in which database.

Two rules, kept here and nowhere else:

* **The database is the statement's.** A KeyManager may be bound to several
  engines (``KeyManager(None, provider)`` + ``keys.bind(engine)``); each has
  its own key table, so an index has one blind-index key *per database*.
  The engine is found from the connection executing the statement
  (:meth:`~sa_envelope.keys.engines.Engines.current`), never from
  ``keys.engine``. A statement on an engine the manager
  is not bound to gets the :class:`~sa_envelope.ConfigurationError` every
  other column gives (:meth:`~sa_envelope.keys.engines.Engines.of`).
* **Writes use the write key, queries every live key** (:mod:`sa_envelope.keys.live`).
  A row's tokens are made under the blind-index write key, so a rotation
  switches writers only after its grace; a query's candidates are the
  rows holding the needle's tokens under *any* live key, computed when the
  statement executes (an expanding bind, as equality does in
  :mod:`sa_envelope.columns.livematch`). While the rebuild job moves rows
  to the new key (:mod:`.rebuild`), each row is found under the key its
  tokens were made with: no lookup misses a row during a rotation.

A query never makes a key: before a table has one, it has no tokens, and a
query's token list is empty. :func:`under` makes tokens under one given
key (a check against each live key, or a rebuild).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, ContextManager, Iterator, Sequence

from sqlalchemy import BigInteger, Connection, Integer, bindparam
from sqlalchemy.sql.elements import BindParameter

from ..errors import UnsupportedQueryError
from ..keys import table as kt
from ..keys.cache import CachedKey
from ..keys.engines import Binding, executing_on
from . import tokens as tk
from .prf import Prf

__all__ = [
    "ARRAY_SLOTS",
    "Inputs",
    "array_slot_param",
    "array_union_param",
    "binding_of",
    "live_keys",
    "subkey_of",
    "threshold_param",
    "tokens_param",
    "under",
    "using",
    "write_subkey",
]

_forced: ContextVar[CachedKey | None] = ContextVar("sa_envelope_search_key", default=None)

ARRAY_SLOTS = 3  # live keys an array lookup serves (a rotation has two)

Inputs = Sequence[bytes]  # a needle's token inputs (docs/format.md), before any key


def using(conn: Connection) -> ContextManager[Connection]:
    """Make tokens in ``conn``'s database where no statement is executing (jobs)."""
    return executing_on(conn)


@contextlib.contextmanager
def under(entry: CachedKey) -> Iterator[CachedKey]:
    """Make tokens under ``entry`` (one live key) instead of the write key."""
    token = _forced.set(entry)
    try:
        yield entry
    finally:
        _forced.reset(token)


def binding_of(index: Any) -> Binding:
    """The bound engine of the executing statement (else the one bound engine)."""
    return index.manager().engines.current()  # type: ignore[no-any-return]


def subkey_of(index: Any, entry: CachedKey) -> Prf:
    """The index's token function under ``entry``, derived once per key (dropped with it).

    Held by the entry's identity: two databases may hold a blind-index key
    of one id (the first key's id is fixed), never the same material."""
    slot = id(entry)
    cached = index._subkey.get(slot)
    if cached is not None and cached[0] is entry:
        return cached[1]  # type: ignore[no-any-return]
    base = Prf(entry.cipher.subkey(tk.derive_context(index.kind, index.owner, index.column, index.settings())))
    entry.remember(index._subkey, slot, (entry, base))
    return base


def write_subkey(index: Any) -> Prf:
    """The subkey new tokens are made under: the write key of the statement's database."""
    entry = _forced.get()
    if entry is None:
        entry = binding_of(index).live.write_key(index.owner, kt.SCOPE_BLIND_INDEX)
    return subkey_of(index, entry)


def live_keys(index: Any) -> tuple[CachedKey, ...]:
    """Every live blind-index key of the statement's database, write key
    first; none while the table has no key."""
    return binding_of(index).live.keys(index.owner, kt.SCOPE_BLIND_INDEX, create=False)


def _token_sets(index: Any, inputs: Inputs) -> list[set[int]]:
    """The needle's tokens under each live key."""
    return [index.digests(subkey_of(index, k), inputs) for k in live_keys(index)]


def tokens_param(index: Any, inputs: Inputs) -> BindParameter[Any]:
    """An expanding bind: the needle's tokens under every live key, at execution."""
    frozen = list(inputs)

    def tokens() -> list[int]:
        return sorted(set().union(*_token_sets(index, frozen)))

    return bindparam(None, callable_=tokens, expanding=True, type_=BigInteger())


def threshold_param(index: Any, inputs: Inputs) -> BindParameter[Any]:
    """How many of the needle's tokens a candidate holds at least: the fewest
    distinct tokens under any one live key (a row holds every token of the
    key its tokens were made with; a mix only adds a candidate to re-check)."""
    frozen = list(inputs)

    def least() -> int:
        return min((len(s) for s in _token_sets(index, frozen)), default=1)

    return bindparam(None, callable_=least, type_=Integer())


def array_union_param(index: Any, inputs: Inputs, type_: Any) -> BindParameter[Any]:
    """One array bind: the needle's tokens under every live key, at execution
    (``tokens && ...``: a row holding any of them is a candidate)."""
    frozen = list(inputs)

    def tokens() -> list[int]:
        return sorted(set().union(*_token_sets(index, frozen)))

    return bindparam(None, callable_=tokens, type_=type_)


def array_slot_param(index: Any, inputs: Inputs, slot: int, type_: Any) -> BindParameter[Any]:
    """One array bind: the needle's tokens under live key ``min(slot, n - 1)``
    of the ``n`` live at execution (none without a key).

    A row's array holds the tokens of one key, so "all tokens" is an ``OR``
    over live keys of ``tokens @> slot``; the statement has
    :data:`ARRAY_SLOTS` of them (a repeated key is harmless) and refuses to
    run while more keys are live than it has slots."""
    frozen = list(inputs)

    def tokens() -> list[int]:
        sets = _token_sets(index, frozen)
        if len(sets) > ARRAY_SLOTS:
            raise UnsupportedQueryError(
                f"{index.owner}.{index.column}: {len(sets)} live blind-index keys; an array lookup "
                f"serves up to {ARRAY_SLOTS} (finish the rotation: rebuild, then retire the old keys)",
                table=index.owner,
                column=index.column,
            )
        return sorted(sets[min(slot, len(sets) - 1)]) if sets else []

    return bindparam(None, callable_=tokens, type_=type_)
