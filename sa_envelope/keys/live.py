"""The live keys of a queryable scope: what equality queries match during a rotation.

Deterministic (AES-SIV) and blind-index (HMAC) keys are one per table, so
that equal values give equal bytes. Rotating one (docs/rotation.md) makes a
second key; until the re-encryption job has moved every value, equal values
are stored under either, and a query must match both. The *live set* of an
(owner, scope) is the keys a query expands to; the *write key* is the one
new values are sealed under. Both are read from the key table, per process,
and kept for :attr:`LivePolicy.ttl` seconds, so a statement costs no query
and a process learns of a rotation made elsewhere within ``ttl``.

The rotation is two-phase by time alone, so a process that has not yet
refreshed never misses a value:

1. ``rotate`` inserts the new key (``active``) and marks the old one
   ``draining``. For :attr:`LivePolicy.grace` seconds after the new key's
   ``created_at`` it is *pending*: matched by every query, not written under.
   Every process refreshes within ``ttl < grace``, so by the time anyone
   writes under it, everyone matches it.
2. After ``grace`` the new key is the write key everywhere (each process
   switches at its next refresh); the old one is still matched until the
   re-encryption job has moved its values and marked it ``retired``.

The rule uses only authenticated metadata (``created_at``, bound into the
key context) to pick the write key: the status decides which older keys are
still matched, which a database writer can change, but matching one more or
one fewer authentic key of the column never makes a wrong value match.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, update

from ..envelope import format as fmt
from ..errors import EnvelopeError
from . import choice
from . import table as kt
from .cache import CachedKey

__all__ = ["DEFAULT_GRACE", "DEFAULT_TTL", "LIVE_STATUSES", "LiveKeys", "LivePolicy", "live_of", "retire_drained"]

DEFAULT_TTL = 5.0  # seconds a process keeps a live set before reading it again
DEFAULT_GRACE = 60.0  # seconds a new key is matched before it is written under
LIVE_STATUSES = frozenset({kt.ACTIVE, kt.DRAINING})


@dataclass(frozen=True)
class LivePolicy:
    """How fast a rotation of a queryable key propagates (docs/rotation.md).

    ``grace`` must exceed ``ttl`` plus the largest clock difference between
    application hosts plus the longest transaction that writes the column.
    """

    ttl: float = DEFAULT_TTL
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        if not 0 < self.ttl < self.grace:
            raise ValueError("LivePolicy needs 0 < ttl < grace")


@dataclass(frozen=True)
class _LiveSet:
    expires: float
    write: CachedKey
    keys: tuple[CachedKey, ...]  # the write key first
    switched_at: float  # epoch seconds from which every older key is no longer written


_BY_STORE: weakref.WeakKeyDictionary[Any, LiveKeys] = weakref.WeakKeyDictionary()


def live_of(store: Any) -> LiveKeys:
    """The live keys that serve ``store`` (each bound engine's store has one)."""
    found = _BY_STORE.get(store)
    if found is None:
        found = LiveKeys(store)  # a store made outside a KeyManager: the default policy
    return found


class LiveKeys:
    """Per-process cache of the live set of each (owner, scope)."""

    def __init__(self, store: Any, policy: LivePolicy | None = None) -> None:
        self.store = store  # a keys.store.KeyStore (not imported: it is the layer's top)
        self.policy = policy or LivePolicy()
        self.refreshes = 0  # key-table reads made for live sets
        self._sets: dict[tuple[str, str], _LiveSet] = {}
        self._lock = threading.Lock()
        _BY_STORE[store] = self  # a job run by one manager over another's columns finds it (live_of)

    # -- the per-statement path -----------------------------------------------------------

    def write_key(self, owner: str, scope: str) -> CachedKey:
        """The key a new value of ``owner`` in ``scope`` is sealed under."""
        live = self._sets.get((owner, scope))
        if live is not None and live.expires > time.monotonic():
            entry = self.store.cache.get(live.write.key_id)  # the cache's age and use limits count
            if entry is live.write:
                return entry
        return self._refresh(owner, scope).write

    def leasable_write_key(self, owner: str, scope: str) -> CachedKey | None:
        """The write key of a live set read back committed and still fresh,
        without counting a use, or ``None`` (the caller takes :meth:`write_key`):
        what a column's write lease (:mod:`.lease`) holds for one statement."""
        live = self._sets.get((owner, scope))
        if live is None:
            return None
        now = time.monotonic()
        write = live.write
        if live.expires > now and write.alive and write.expires > now:
            return write
        return None

    def keys(self, owner: str, scope: str, *, create: bool = True) -> tuple[CachedKey, ...]:
        """Every key a query on ``owner`` in ``scope`` matches, write key first.
        ``create=False``: none while the table has no such key (a search
        query then finds no tokens, and a query never makes a key)."""
        live = self._sets.get((owner, scope))
        now = time.monotonic()
        if live is not None and live.expires > now and all(k.alive and k.expires > now for k in live.keys):
            return live.keys
        if create:
            return self._refresh(owner, scope).keys
        found = self._find(owner, scope)
        return found.keys if found is not None else ()

    def close(self) -> None:
        """Its engine was unbound: forget every live set, and that it serves its store."""
        self.invalidate()
        if _BY_STORE.get(self.store) is self:
            del _BY_STORE[self.store]

    def invalidate(self, owner: str | None = None) -> None:
        """Forget cached live sets (all, or one table's): after a rotation here."""
        with self._lock:
            if owner is None:
                self._sets.clear()
            else:
                for k in [k for k in self._sets if k[0] == owner]:
                    del self._sets[k]

    def switched_at(self, owner: str, scope: str) -> float:
        """Epoch seconds from which no process writes under a key older than
        the newest one (its ``created_at`` plus ``grace`` plus ``ttl``)."""
        return self._refresh(owner, scope).switched_at + self.policy.ttl

    # -- reading the key table --------------------------------------------------------------

    def _refresh(self, owner: str, scope: str) -> _LiveSet:
        live = self._find(owner, scope)
        if live is None:  # no key yet: the store makes the first one, in the writer's transaction
            first: CachedKey = self.store.encryption_key(owner, scope)
            return _LiveSet(0.0, first, (first,), 0.0)  # not cached: it may not be committed
        return live

    def _find(self, owner: str, scope: str) -> _LiveSet | None:
        """The live set as the executing transaction sees the key table (``None``: no key)."""
        store = self.store
        conn = store.tracker.current()
        if conn is None:
            with store.engine.connect() as own:  # a read only: closed before any key is made
                return self._read(own, owner, scope)
        # the table's first key, made by this very transaction: its one key
        state = store.tracker.state(conn)
        made = state.active.get((owner, scope))
        entry = store.cache.get(made) if made is not None and made in state.created else None
        if entry is not None:
            return _LiveSet(0.0, entry, (entry,), 0.0)
        return self._read(conn, owner, scope)

    def _read(self, conn: Connection, owner: str, scope: str) -> _LiveSet | None:
        store, now = self.store, kt.utcnow()
        self.refreshes += 1
        records = store.query(lambda: kt.find_candidates(conn, store.table, owner, scope, choice.CANDIDATES), owner)
        usable = [(r, e) for r in records if (e := store.usable(r, conn, now)) is not None]
        if not usable:
            return None
        live_keys = [(r, e) for r, e in usable if r.status in LIVE_STATUSES]
        if not live_keys:  # fail closed, as KeyStore.current does: a retired key is never written
            raise EnvelopeError(
                f"no {scope} key of {owner} is live (active or draining): none may be a write key (see verify)",
                table=owner,
                key_id=fmt.format_key_id(usable[0][0].id),
            )
        write_record, write = self._write_of(live_keys, now.timestamp())
        others = tuple(e for r, e in usable if r.id != write_record.id and r.status in LIVE_STATUSES)
        newest = kt.created_seconds(usable[0][0].created_at)
        live = _LiveSet(time.monotonic() + self.policy.ttl, write, (write, *others), newest + self.policy.grace)
        created = store.tracker.state(conn).created
        if not any(r.id in created for r, _ in usable):  # only committed keys are shared
            with self._lock:
                self._sets[(owner, scope)] = live
        return live

    def _write_of(self, usable: list[tuple[kt.KeyRecord, CachedKey]], now: float) -> tuple[kt.KeyRecord, CachedKey]:
        """The newest live key past its grace; else the oldest live one
        (``usable`` is newest first: nothing was written under an older key;
        an older key already retired was drained by a job that judged the
        grace over, so its successor is the write key here too)."""
        for record, entry in usable:
            if kt.created_seconds(record.created_at) + self.policy.grace <= now:
                return record, entry
        return usable[-1]


def retire_drained(conn: Connection, table: Any, key_id: int) -> bool:
    """Mark a drained key ``retired`` (no longer matched); compare-and-set on
    ``draining``, so a concurrent change of status is left alone."""
    result = conn.execute(
        update(table)
        .where(table.c.id == key_id, table.c.status == kt.DRAINING)
        .values(status=kt.RETIRED, updated_at=kt.utcnow())
    )
    return int(result.rowcount) == 1
