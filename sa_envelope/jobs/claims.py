"""Workers that share a job through the database alone: claimed key ranges.

A job over a table with an integer primary key is cut into ranges
``[lo, hi)`` recorded in ``sa_envelope_claims`` (:meth:`Claims.plan`, once,
idempotent). A worker takes a free range with a compare-and-set
(:meth:`Claims.claim`: ``UPDATE ... WHERE owner IS NULL OR expires < now``,
one winner), works through it batch by batch and, **inside each batch's
transaction and before its writes**, moves the range's cursor
(:meth:`Claims.advance`: ``UPDATE ... WHERE owner = me``). So:

* progress is durable exactly when the batch's rows are: a crash at any
  point loses at most the batch in flight, and whoever takes the range next
  starts at its cursor (resume);
* a worker that lost its range (its lease ran out while it stalled, and
  another took it) fails its advance and rolls its batch back: two workers
  never commit writes to the same rows; on PostgreSQL and MariaDB the
  advance's row lock also holds off a thief until the batch commits;
* a worker that died holds its range until the lease (seconds, from the
  workers' clocks: keep them within a fraction of it) expires; then any
  worker, or a rerun, takes it over from its cursor.

No coordinator: any number of processes on any number of hosts may run the
same job. Generic: a job is a name, the ranges are just integers, so the
re-encryption or any batched job can use it (``claims.run`` drives a
callback per batch). SQLite serialises writers: run one worker there.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from ..errors import ClaimLostError
from ..locking import read_committed

__all__ = ["CLAIMS_TABLE", "Claim", "Claims", "claims_table", "worker_name"]

CLAIMS_TABLE = "sa_envelope_claims"


def claims_table(metadata: MetaData, name: str = CLAIMS_TABLE) -> Table:
    """The claims table on ``metadata`` (or the one already there)."""
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name,
        metadata,
        Column("job", String(255), primary_key=True),
        Column("lo", BigInteger, primary_key=True, autoincrement=False),
        Column("hi", BigInteger, nullable=False),
        Column("cursor", BigInteger, nullable=False),  # everything below it is done
        Column("owner", String(128), nullable=True),
        Column(
            "expires", Double, nullable=True
        ),  # epoch seconds, the owner's lease (DOUBLE: a MySQL FLOAT rounds to minutes)
        Column("done", Boolean, nullable=False, default=False),
        Column("written", Integer, nullable=False, default=0),  # rows the job changed in it
    )


def worker_name() -> str:
    """A name no other live worker has: host, process, thread."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass
class Claim:
    """A range a worker holds: it works on ``[cursor, hi)``."""

    lo: int
    hi: int
    cursor: int
    owner: str


class Claims:
    """The claimed ranges of one job (``job`` names it, e.g. ``backfill:users.email``)."""

    def __init__(self, engine: Engine, job: str, *, lease: float = 60.0, table_name: str = CLAIMS_TABLE) -> None:
        self.engine, self.job, self.lease = engine, job, lease
        self.table = claims_table(MetaData(), table_name)

    def create(self) -> None:
        self.table.create(self.engine, checkfirst=True)

    def planned(self, conn: Connection) -> bool:
        t = self.table
        return conn.execute(select(func.count()).select_from(t).where(t.c.job == self.job)).scalar_one() > 0

    def plan(self, lo: int, hi: int, size: int) -> bool:
        """Cut ``[lo, hi)`` into ranges of ``size`` unless the job has some
        already (a rerun, or a concurrent first worker). True if it planned."""
        t = self.table
        rows = [
            {"job": self.job, "lo": a, "hi": min(a + size, hi), "cursor": a, "done": False, "written": 0}
            for a in range(lo, hi, size)
        ]
        try:
            with self.engine.begin() as conn:
                if self.planned(conn):
                    return False
                if rows:
                    conn.execute(insert(t), rows)
                else:  # an empty table: one empty range marks the job planned
                    conn.execute(insert(t), [{"job": self.job, "lo": lo, "hi": lo, "cursor": lo, "done": True}])
        except IntegrityError:  # another worker planned it first
            return False
        return True

    def reset(self) -> None:
        """Forget the job (a rerun then plans and checks every row again)."""
        with self.engine.begin() as conn:
            conn.execute(delete(self.table).where(self.table.c.job == self.job))

    def pending(self) -> tuple[int, int]:
        """(ranges not done, of which held by a live lease)."""
        t, now = self.table, time.time()
        with self.engine.connect() as conn:
            left = and_(t.c.job == self.job, t.c.done.is_(False))
            total = conn.execute(select(func.count()).select_from(t).where(left)).scalar_one()
            held = conn.execute(select(func.count()).select_from(t).where(left, t.c.expires >= now)).scalar_one()
        return int(total), int(held)

    def span_left(self) -> int:
        """Primary-key span not done yet, over every range (the progress total)."""
        t = self.table
        with self.engine.connect() as conn:
            left = conn.execute(
                select(func.coalesce(func.sum(t.c.hi - t.c.cursor), 0)).where(t.c.job == self.job, t.c.done.is_(False))
            ).scalar_one()
        return int(left)

    def claim(self, owner: str) -> Claim | None:
        """Take a free range (compare-and-set), or None if none is free now."""
        t, now = self.table, time.time()
        free = and_(t.c.job == self.job, t.c.done.is_(False), or_(t.c.owner.is_(None), t.c.expires < now))
        with self.engine.connect() as conn:
            candidates = conn.execute(select(t.c.lo).where(free).order_by(t.c.lo).limit(16)).scalars().all()
            conn.rollback()
            for lo in candidates:
                with conn.begin():
                    taken = conn.execute(
                        update(t).where(free, t.c.lo == lo).values(owner=owner, expires=now + self.lease)
                    )
                    if taken.rowcount != 1:
                        continue
                    row = conn.execute(select(t.c.hi, t.c.cursor).where(t.c.job == self.job, t.c.lo == lo)).one()
                return Claim(lo, int(row.hi), int(row.cursor), owner)
        return None

    def advance(self, conn: Connection, claim: Claim, cursor: int, written: int) -> None:
        """Move the cursor in the batch's transaction (call before its writes);
        :class:`ClaimLostError` if the range is no longer ours."""
        t = self.table
        moved = conn.execute(
            update(t)
            .where(t.c.job == self.job, t.c.lo == claim.lo, t.c.owner == claim.owner, t.c.done.is_(False))
            .values(
                cursor=cursor, done=cursor >= claim.hi, written=t.c.written + written, expires=time.time() + self.lease
            )
        )
        if moved.rowcount != 1:
            raise ClaimLostError(f"job {self.job}: range {claim.lo}-{claim.hi} was taken over by another worker")
        claim.cursor = cursor

    def run(self, owner: str, batch: Callable[[Connection, Claim], int], *, poll: float = 1.0) -> tuple[int, list[int]]:
        """Claim ranges and run ``batch(conn, claim)`` (one transaction each;
        it must call :meth:`advance`) until every range is done. Waits for
        ranges other workers hold (they may die). Returns (items, ranges
        finished by this worker, by their ``lo``)."""
        items, finished = 0, list[int]()
        while True:
            claim = self.claim(owner)
            if claim is None:
                left, _ = self.pending()
                if not left:
                    return items, finished
                time.sleep(poll)  # held by others: done soon, or their lease runs out
                continue
            try:
                while claim.cursor < claim.hi:
                    with read_committed(self.engine) as conn, conn.begin():
                        items += batch(conn, claim)
            except ClaimLostError:
                continue
            except BaseException:
                self.release(claim)  # a failing worker frees its range at once (a dead one: at the lease)
                raise
            finished.append(claim.lo)

    def release(self, claim: Claim) -> None:
        """Give a range back (its cursor stays), if it is still ours."""
        t = self.table
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    update(t)
                    .where(t.c.job == self.job, t.c.lo == claim.lo, t.c.owner == claim.owner)
                    .values(owner=None, expires=None)
                )
        except Exception:  # the database is what failed: the lease frees the range
            pass
