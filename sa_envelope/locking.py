"""How a job's batch that locks rows meets other writers: the isolation it
runs in and the retry of a batch the database chose as a deadlock victim.

Jobs (rewrap, re-encryption, the search-index rebuild) lock the rows of one
batch, change them and commit. Two rules keep them from stalling or failing
beside the application and beside each other:

* On MySQL/MariaDB a batch runs in READ COMMITTED (:func:`read_committed`).
  Under InnoDB's default REPEATABLE READ, ``SELECT ... FOR UPDATE`` keeps a
  lock on every row it *scanned*, matching or not, and on the gaps between
  them, and ``DELETE`` locks gaps too: a worker taking the rows ``id % 2 ==
  0`` held its sibling's odd rows, and two workers deleting and inserting
  neighbouring search tokens deadlocked (seen in CI).
* A batch that still loses a deadlock (InnoDB error 1213, PostgreSQL
  SQLSTATE 40P01) was rolled back whole by the database, so running it
  again from its start is exactly right (:func:`retry_deadlocks`): each
  batch re-reads what still needs the work. Any other error is raised.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

__all__ = ["DEADLOCK_TRIES", "is_deadlock", "read_committed", "retry_deadlocks"]

T = TypeVar("T")

DEADLOCK_TRIES = 5  # attempts of one batch; a sixth deadlock in a row is raised
_MYSQL_DEADLOCK = 1213
_POSTGRESQL_DEADLOCK = "40P01"


def read_committed(engine: Engine) -> Connection:
    """A connection for one batch that locks rows: on MySQL/MariaDB in READ
    COMMITTED (see module doc); elsewhere the engine's own isolation."""
    conn = engine.connect()
    if conn.dialect.name in ("mysql", "mariadb"):
        conn.execution_options(isolation_level="READ COMMITTED")
    return conn


def is_deadlock(exc: BaseException) -> bool:
    """Whether ``exc`` is the database rolling a transaction back to break a
    deadlock (PyMySQL, mysqlclient, asyncmy: error 1213; psycopg, psycopg2,
    asyncpg: SQLSTATE 40P01)."""
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and args[0] == _MYSQL_DEADLOCK:
        return True
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state == _POSTGRESQL_DEADLOCK


def retry_deadlocks(attempt: Callable[[], T], *, tries: int = DEADLOCK_TRIES) -> T:
    """``attempt()``, run again (after a short random pause, so the two
    sides do not meet again in step) while the database breaks a deadlock
    by rolling it back; ``attempt`` must be one whole transaction."""
    for n in range(1, tries):
        try:
            return attempt()
        except DBAPIError as exc:
            if not is_deadlock(exc):
                raise
        time.sleep((10 + secrets.randbelow(40)) * n / 1000)
    return attempt()
