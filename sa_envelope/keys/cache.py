"""A bounded, thread-safe cache of plaintext data keys.

Modelled on the AWS Encryption SDK's local cache: entries expire by age and
by number of uses, and the cache holds at most ``max_size`` keys (the oldest
loaded goes first). Reads take no lock: a dict lookup is atomic in CPython,
and the per-value path must stay cheap. Writes and evictions take the lock.
Use counts come from ``itertools.count`` (atomic under the GIL), so the
limit holds across threads without a lock per value; the hit and miss
statistics are plain integers and may undercount under contention.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..envelope.ciphers import RowKeyCipher

__all__ = ["CacheLimits", "CachedKey", "KeyCache"]


@dataclass(frozen=True)
class CacheLimits:
    """How long and how much a plaintext key may be served from memory.

    Defaults: 1,000 keys, 15 minutes, 2**24 uses. A key past its age or use
    limit is unwrapped again through the provider on next use, which is what
    bounds how long a revoked CMK keeps working in a running process. Uses
    count encryptions (values sealed with the cached key), one by one, also
    on the column types' fast path; decryptions are bounded by age only. The
    column types judge the age once per statement (:mod:`.clock`): a
    statement that started with a fresh key finishes with it.
    """

    max_size: int = 1_000
    max_age: float = 900.0
    max_uses: int = 1 << 24


@dataclass(eq=False, repr=False, slots=True)
class CachedKey:
    """One plaintext key ready to use: its cipher object, built once. Slotted:
    a stream or a bulk read holds tens of thousands of row keys."""

    key_id: int
    cipher: Any
    head: bytes  # the value header for this key: version byte + key id
    expires: float
    # ``None`` until first counted (row keys, made or read back: KeyCache.put_bound):
    # one object fewer per key for every garbage collection to walk
    uses: itertools.count[int] | None = field(default_factory=itertools.count)
    alive: bool = True  # False once evicted: per-column read memos check it
    owner: str = ""  # the owner table and scope its key row was authenticated with
    scope: str = ""
    # what columns derived from this key (read memos, blind-index subkeys):
    # (holder dict, slot) pairs, emptied when the entry dies so that no copy
    # of the key outlives the cache's limits. ``None`` until the first: a
    # row key rarely has any, and a 20,000-row statement's 20,000 empty lists
    # were 20,000 more objects for every garbage collection to walk
    derived: list[tuple[dict[Any, Any], Any]] | None = None

    def remember(self, holder: dict[Any, Any], slot: Any, value: Any) -> None:
        """Put ``value`` (derived from this key) in ``holder[slot]`` until this entry dies."""
        holder[slot] = value
        derived = self.derived
        if derived is None:
            derived = self.derived = []
        derived.append((holder, slot))
        if not self.alive:  # died meanwhile (maybe while appending to a list kill() took): take it back
            holder.pop(slot, None)
            self.kill()

    def kill(self) -> None:
        """Mark dead and drop every value derived from this key (and the
        OpenSSL object a row key's cipher keeps for this thread)."""
        self.alive = False
        if type(self.cipher) is RowKeyCipher:
            self.cipher.release()
        derived, self.derived = self.derived, None
        for holder, slot in derived or ():
            holder.pop(slot, None)

    bound: bytes | None = None  # row keys: the authenticated digest of their row (rows.binding)
    wrapped: Any = None  # row keys made unbound, until bound: (parent key, version-1 wrap or None if deferred)

    def __repr__(self) -> str:
        return f"CachedKey({self.key_id:016x})"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a cached key holds key material and cannot be pickled")


class KeyCache:
    """Plaintext keys by key id, bounded by size, age and uses."""

    def __init__(self, limits: CacheLimits) -> None:
        self.limits = limits
        self._entries: OrderedDict[int, CachedKey] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # plain ints: statistics, not limits (+= may race)
        self.misses = 0
        self.evictions = 0

    def get(self, key_id: int) -> CachedKey | None:
        """The cached key, or ``None`` if absent, too old or used up."""
        entry = self._entries.get(key_id)
        if entry is None:
            self.misses += 1
            return None
        uses = entry.uses
        if uses is None:
            with self._lock:  # made once, under the lock: no use counted on a counter that is then replaced
                uses = entry.uses = entry.uses or itertools.count()
        if time.monotonic() >= entry.expires or next(uses) >= self.limits.max_uses:
            self.evict(key_id)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def peek(self, key_id: int) -> CachedKey | None:
        """The cached key if present and fresh, without counting a use.

        For decryption: the use limit bounds how many values one key
        *encrypts* (AES-GCM's nonce budget); reading is bounded by age only.
        """
        entry = self._entries.get(key_id)
        if entry is not None:
            if time.monotonic() < entry.expires:
                self.hits += 1
                return entry
            self.evict(key_id)  # expired: its derived values go with it
        return None

    def put(self, key_id: int, cipher: Any, head: bytes, owner: str = "", scope: str = "") -> CachedKey:
        """Cache a cipher object for ``key_id``, evicting the oldest if full."""
        entry = CachedKey(key_id, cipher, head, time.monotonic() + self.limits.max_age, owner=owner, scope=scope)
        with self._lock:
            self._store(entry)
            self._trim()
        return entry

    def evict(self, key_id: int) -> None:
        """Forget one key (rolled back, shredded, expired)."""
        with self._lock:
            entry = self._entries.pop(key_id, None)
            if entry is not None:
                entry.kill()
                self.evictions += 1

    def evict_many(self, key_ids: Iterable[int]) -> None:
        """Forget many keys under one lock (a stream's partitions gone by:
        10,000 a partition, so :meth:`CachedKey.kill` is inlined for the
        usual row key, which has nothing derived)."""
        pop, evicted, row_cipher = self._entries.pop, 0, RowKeyCipher
        with self._lock:
            for key_id in key_ids:
                entry = pop(key_id, None)
                if entry is None:
                    continue
                evicted += 1
                if entry.derived is not None:
                    entry.kill()
                    continue
                entry.alive = False
                if type(entry.cipher) is row_cipher:
                    entry.cipher.release()
            self.evictions += evicted

    def clear(self) -> None:
        """Forget every key."""
        with self._lock:
            for entry in self._entries.values():
                entry.kill()
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, entry: CachedKey) -> None:
        """Add or replace an entry (under the lock); a replaced one dies."""
        old = self._entries.pop(entry.key_id, None)
        if old is not None:
            old.kill()
        self._entries[entry.key_id] = entry

    def _trim(self) -> None:
        """Drop the oldest entries beyond ``max_size`` (under the lock)."""
        while len(self._entries) > self.limits.max_size:
            _, old = self._entries.popitem(last=False)
            old.kill()
            self.evictions += 1

    # -- row scope (issue 3): many row keys at once ----------------------------------

    def put_many(self, items: Iterable[tuple[int, Any, bytes]]) -> list[CachedKey]:
        """Cache ``(key_id, cipher, head)`` triples under one lock and one clock read."""
        expires = time.monotonic() + self.limits.max_age
        entries = [CachedKey(key_id, cipher, head, expires) for key_id, cipher, head in items]
        self._store_many(entries)
        return entries

    def put_bound(
        self, key_ids: list[int], ciphers: list[Any], heads: list[bytes], bound: list[bytes | None]
    ) -> list[CachedKey]:
        """Cache row keys (made for an INSERT, or read back): as
        :meth:`put_many`, from parallel lists (no tuple per key), each
        entry's row digest set as it is made, its use counter made at its
        first counted use (one object fewer per key for the collector)."""
        expires = time.monotonic() + self.limits.max_age
        make = CachedKey
        entries = [make(k, c, h, expires, None, bound=b) for k, c, h, b in zip(key_ids, ciphers, heads, bound)]
        self._store_many(entries)
        return entries

    def _store_many(self, entries: list[CachedKey]) -> None:
        """Add entries under one lock (``_store`` inlined: 10,000 a partition)."""
        store, pop = self._entries.__setitem__, self._entries.pop
        with self._lock:
            for entry in entries:
                old = pop(entry.key_id, None)
                if old is not None:
                    old.kill()
                store(entry.key_id, entry)
            self._trim()
