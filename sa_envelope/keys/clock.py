"""The statement clock: what the per-value path reads instead of the time.

A cached key is bounded by age (``CacheLimits.max_age``), and a write key is
the one the store trusts *now* (a rotation or a roll-over changes it). Both
used to be checked per value: a ``time.monotonic()`` call and the store's
dict lookups for each of 20,000 values of one executemany. They are now
checked once per statement: every statement any Engine of the process
executes (``before_execute``, a class-level listener) moves this clock on:
``epoch`` changes and ``now`` is read once. The column types' write leases
and read memos (:mod:`sa_envelope.columns.encrypted`) are re-checked when
the epoch they were checked at is not the current one; row keys compare
their expiry with ``now``.

What that means for the bounds (docs/api.md, ``CacheLimits``): a key's age
is judged when a statement starts, so a statement that started with a fresh
key finishes with it (also a long stream); the use limits are still counted
per value, exactly.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from sqlalchemy import Engine, event

__all__ = ["CLOCK", "StatementClock", "install"]


class StatementClock:
    """The current statement's epoch (a unique int) and start time (monotonic)."""

    __slots__ = ("epoch", "now", "_ticks")

    def __init__(self) -> None:
        self._ticks = itertools.count(1)  # atomic under the GIL: no two statements share an epoch
        self.epoch = 0
        self.now = time.monotonic()

    def tick(self, *args: Any) -> None:
        """A statement starts: a new epoch, the time read once."""
        self.now = time.monotonic()
        self.epoch = next(self._ticks)


CLOCK = StatementClock()
_lock = threading.Lock()
_installed = False


def install() -> None:
    """Move :data:`CLOCK` on with every statement of every Engine (idempotent)."""
    global _installed
    with _lock:
        if not _installed:
            event.listen(Engine, "before_execute", CLOCK.tick)
            _installed = True
