"""Write leases: a column's write key, checked once per statement.

Before, every value asked the store for its table's write key: the
trusted-key dict, the cache's age check (a ``time.monotonic()`` call) and
two use counters, about a third of a microsecond per value. A lease holds
what that lookup found (the cached key and its two counters; the column's
fast path, ``columns.fastpath``, unpacks it with the associated data
precomputed, ``format.associated_data``) and is checked again when a new statement
starts (:mod:`.clock`): the key is still the store's trusted write key of
(owner, scope), alive in the cache and younger than ``max_age``. What stays
per value is what must be exact: the key's cache uses (``max_uses``) and,
for table keys, the roll-over budget (``max_encryptions``), each one
``next()`` of the same counter the store counts on; when either runs out the
value takes the store's own path, which evicts or rolls the key over.

A lease is made only from the store's trusted write key (read back
committed: ``KeyStore._active``). A key made by the caller's own open
transaction is not trusted yet and is never leased: such values go through
:meth:`KeyStore.encryption_key`, which knows the transaction.
"""

from __future__ import annotations

import itertools

import time
from typing import Any

from . import table as kt
from .cache import CachedKey
from .clock import CLOCK
from .live import LiveKeys
from .store import KeyStore

__all__ = ["WriteLease", "live_lease", "write_lease"]


class WriteLease:
    """One write key of one column, for the statements it stays valid in."""

    __slots__ = ("budget", "context", "entry", "epoch", "key_id", "limit", "owner", "scope", "uses")

    def __init__(self, entry: CachedKey, owner: str, scope: str, context: bytes, budget: Any, limit: int) -> None:
        self.entry = entry
        self.key_id = entry.key_id
        self.owner = owner
        self.scope = scope
        self.context = context
        if entry.uses is None:  # only row keys read back count lazily, and no lease holds those
            raise TypeError("a write lease needs a table key's cache entry")
        self.uses: itertools.count[int] = entry.uses  # the cache's use counter of this entry (max_uses)
        self.budget = budget  # the roll-over budget's counter of this key (table keys), or None
        self.limit = limit
        self.epoch = CLOCK.epoch

    def renew(self, store: KeyStore, context: bytes) -> bool:
        """Still valid for the statement now running? Stamped with its epoch if so."""
        entry = self.entry
        valid = (
            entry.alive
            and context is self.context
            and store._active.get((self.owner, self.scope)) == self.key_id
            and entry.expires > time.monotonic()
        )
        if valid:
            self.epoch = CLOCK.epoch
        return valid


def write_lease(store: KeyStore, owner: str, scope: str, context: bytes, old: WriteLease | None) -> WriteLease | None:
    """The lease for values of (owner, scope) in the statement now running:
    ``old`` renewed, or a new one on the store's trusted write key; ``None``
    when there is none (first write, a key of the caller's transaction, a
    cache miss): the caller then takes the store's path."""
    if old is not None and old.renew(store, context):
        return old
    key_id = store._active.get((owner, scope))
    if key_id is None:
        return None
    entry = store.cache.peek(key_id)  # fresh, alive; no use counted yet
    if entry is None or entry.scope not in ("", scope):
        return None
    budget = store.budget
    if scope == kt.SCOPE_TABLE and budget.limit:
        return WriteLease(entry, owner, scope, context, budget.counts[key_id], budget.limit)
    return WriteLease(entry, owner, scope, context, None, 0)


def live_lease(live: LiveKeys, owner: str, scope: str, context: bytes, old: WriteLease | None) -> WriteLease | None:
    """The lease of a deterministic column for the statement now running:
    the write key of its live set (:mod:`.live`: it follows a rotation's
    two-phase switch, not the store's newest key), found once per statement
    instead of once per value; ``None`` when the set is not cached and
    committed (the caller takes :meth:`LiveKeys.write_key`, which reads it)."""
    entry = live.leasable_write_key(owner, scope)
    if entry is None:
        return None
    if old is not None and old.entry is entry and old.context is context:
        old.epoch = CLOCK.epoch
        return old
    return WriteLease(entry, owner, scope, context, None, 0)
