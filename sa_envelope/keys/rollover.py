"""Table-key roll-over: a new data key for new values, old ones kept for reading.

AES-GCM with random 96-bit nonces is safe for at most 2**32 encryptions
under one key (NIST SP 800-38D, section 8.3): beyond that the chance of a
repeated nonce, which leaks the authentication key, is no longer negligible.
A :class:`RolloverPolicy` bounds each table key by age and by the number of
encryptions this process made with it; when either is reached the next
write creates a new active key (in the writer's transaction, like any new
key) and marks the old one ``retired``. Retired keys still decrypt.

Only table-scope keys roll over. Deterministic (AES-SIV) keys do not: a new
one would make equal values encrypt differently and break equality queries;
they have no nonce to run out of. Row keys encrypt one row each.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import Connection, Table, func, select, update

from . import table as kt
from .choice import CLOCK_SKEW

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_ENCRYPTIONS",
    "EncryptionBudget",
    "RolloverPolicy",
    "created_at",
    "lock_active",
    "retire_others",
    "successor_time",
]

DEFAULT_MAX_AGE = 30 * 24 * 3600.0  # 30 days, in seconds
DEFAULT_MAX_ENCRYPTIONS = 1 << 26  # per process: 64 process lifetimes before 2**32


@dataclass(frozen=True)
class RolloverPolicy:
    """When a table key is replaced by a new one (``None`` disables a limit).

    ``max_encryptions`` is counted per process, from when the process first
    uses the key; ``max_age`` is measured from the key's ``created_at``, so
    it also bounds what many processes and restarts add up to. See
    docs/rotation.md for how the defaults keep a key under 2**32 uses.
    """

    max_age: float | None = DEFAULT_MAX_AGE
    max_encryptions: int | None = DEFAULT_MAX_ENCRYPTIONS

    def __post_init__(self) -> None:
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError("max_age must be positive or None")
        if self.max_encryptions is not None and self.max_encryptions < 1:
            raise ValueError("max_encryptions must be at least 1 or None")

    def too_old(self, created: dt.datetime | None, now: dt.datetime | None = None) -> bool:
        """Whether a key created at ``created`` is past ``max_age``."""
        if self.max_age is None or created is None:
            return False
        if created.tzinfo is None:  # SQLite and MariaDB return naive UTC
            created = created.replace(tzinfo=dt.timezone.utc)
        return ((now or kt.utcnow()) - created).total_seconds() >= self.max_age


class EncryptionBudget:
    """AES-GCM encryptions made under each table key by this process: every
    value sealed (also inside the transaction that made the key) and every
    row key wrapped under it. ``counts`` is read inline by the store's
    per-value path; bulk uses go through :meth:`take`."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit or 0  # 0: no limit
        self.counts: defaultdict[int, itertools.count[int]] = defaultdict(itertools.count)
        self._lock = threading.Lock()

    def take(self, key_id: int, uses: int) -> bool:
        """Count ``uses`` encryptions under ``key_id``: whether it had the budget."""
        if not self.limit:
            return True
        if uses > self.limit:
            raise ValueError(f"{uses} encryptions exceed max_encryptions={self.limit}")
        counter, last = self.counts[key_id], 0
        with self._lock:
            for _ in range(uses):
                last = next(counter)
        return last < self.limit

    def batch(self, count: int) -> int:
        """How many encryptions of ``count`` one key can take in one go."""
        return min(count, self.limit or count)


def successor_time(conn: Connection, table: Table, owner: str, scope: str, now: dt.datetime) -> dt.datetime:
    """The created time of a key replacing the current ones: ``now``, or one
    second after the newest key of (owner, scope) if that is not earlier
    (created times are whole seconds on every backend, and "newer" must be
    exact: see keys.choice). Rows dated beyond the clock skew are ignored, so
    a planted far-future row cannot push our keys into the future."""
    newest = conn.execute(
        select(func.max(table.c.created_at)).where(
            table.c.owner_table == owner, table.c.scope == scope, table.c.created_at <= now + CLOCK_SKEW
        )
    ).scalar()
    if not isinstance(newest, dt.datetime):
        return now
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=dt.timezone.utc)
    return max(now, newest.replace(microsecond=0) + dt.timedelta(seconds=1))


def created_at(conn: Connection, table: Table, key_id: int) -> dt.datetime | None:
    """When the key row was inserted."""
    return conn.execute(select(table.c.created_at).where(table.c.id == key_id)).scalar_one_or_none()


def retire_others(conn: Connection, table: Table, owner: str, scope: str, keep: int) -> int:
    """Mark every other active key of ``owner``/``scope`` retired (still readable);
    a deterministic or blind-index key becomes ``draining`` instead: queries
    keep matching it until its values are moved (keys.live)."""
    status = kt.DRAINING if scope in kt.SINGLETON_SCOPES else kt.RETIRED
    result = conn.execute(
        update(table)
        .where(table.c.owner_table == owner, table.c.scope == scope, table.c.status == kt.ACTIVE, table.c.id != keep)
        .values(status=status, updated_at=kt.utcnow())
    )
    return int(result.rowcount)


def lock_active(conn: Connection, table: Table, owner: str, scope: str) -> None:
    """Serialise explicit rotations of one table (row locks where the database has them)."""
    stmt = select(table.c.id).where(table.c.owner_table == owner, table.c.scope == scope, table.c.status == kt.ACTIVE)
    if conn.dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    conn.execute(stmt).all()
