"""The guard sweep: remove uniqueness guard rows that guard nothing any more.

Guard rows (:mod:`sa_envelope.columns.guardrows`) matter only while a table's
deterministic key has two live keys; the re-encryption run that retires the
old key removes the table's guards. Some can come back or stay after it
(docs/rotation.md): a writer whose view of the keys is older than the
retirement (up to ``LivePolicy.ttl``) still checks its write and may make a
few again, and on MariaDB the guards of a write refused or rolled back stay
(they are made and committed on a connection of their own). They are lock
points only, harmless and bounded; this sweep removes them without waiting
for the next rotation's end.

Each owner table is decided on its own, in one transaction with its live key
rows read under a row lock (:func:`~sa_envelope.columns.guardrows.remove_settled`
says why a rotation starting meanwhile loses no guard): the guards of a
table with at most one live deterministic key are deleted, those of a table
mid-rotation are counted and kept. A transaction the database rolls back to
break a deadlock (a writer locking guards as the DELETE reaches them) runs
again; a rerun finds only what is left, which is the resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from sqlalchemy import Engine, Table

from ..columns.guardrows import guard_owners, remove_settled
from ..locking import read_committed, retry_deadlocks

__all__ = ["GuardSweepReport", "sweep_guards"]


@dataclass
class GuardSweepReport:
    """``removed``: per owner table, the guards deleted (on a dry run: that
    would be); ``kept``: per table mid-rotation (two or more live
    deterministic keys), its guards, left in place."""

    removed: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def total(self) -> int:
        """The guards removed (on a dry run: that would be) over every table."""
        return sum(self.removed.values())

    def __str__(self) -> str:
        action = "would remove (dry run)" if self.dry_run else "removed"
        text = f"guard sweep: {action} {self.total} guard rows of {len(self.removed)} tables"
        if self.kept:
            rotating = ", ".join(f"{t} ({n})" for t, n in self.kept.items())
            text += f"; kept, rotation in progress: {rotating}"
        return text


def sweep_guards(engine: Engine, keys: Table, table: str | None = None, *, dry_run: bool = False) -> GuardSweepReport:
    """Remove (``dry_run``: count) the guard rows beside the key table ``keys``
    of every owner table, or of ``table`` alone, that no rotation needs."""
    report = GuardSweepReport(dry_run=dry_run)
    with engine.connect() as conn:
        owners = guard_owners(conn, keys)
    for owner in owners if table is None else [o for o in owners if o == table]:
        settled, count = retry_deadlocks(partial(_sweep_one, engine, keys, owner, dry_run))
        (report.removed if settled else report.kept)[owner] = count
    return report


def _sweep_one(engine: Engine, keys: Table, owner: str, dry_run: bool) -> tuple[bool, int]:
    """One owner's decision and removal, in one transaction (READ COMMITTED on
    MariaDB: its DELETE then locks the guard rows it removes, not the gaps)."""
    with read_committed(engine) as conn, conn.begin():
        return remove_settled(conn, keys, owner, dry_run=dry_run)
