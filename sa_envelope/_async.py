"""asyncio support: key-provider calls off the event loop, and cache warming.

With an ``AsyncEngine``, SQLAlchemy runs statements (and so our bind and
result processing) inside a greenlet that hands each database wait back to
the event loop. A key-cache miss there calls the key provider, which is
blocking code (boto3). :func:`run_blocking` detects that greenlet and runs
the call in a worker thread (``asyncio.to_thread``) through SQLAlchemy's
``await_``, so the event loop keeps serving other tasks while KMS answers:
the task that needs the key waits; no other task does.

:func:`warm` loads the keys of some tables into the cache ahead of use (at
start-up), so that the first requests make no provider call at all.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

from sqlalchemy import select
from sqlalchemy.util.concurrency import await_, greenlet_spawn, in_greenlet

from . import _keytable as kt

if TYPE_CHECKING:
    from ._manager import KeyManager

__all__ = ["create_table_async", "run_blocking", "warm", "warm_async"]

T = TypeVar("T")


def run_blocking(fn: Callable[[], T]) -> T:
    """Call ``fn``; inside an async statement, in a thread, not on the loop."""
    if in_greenlet():
        return await_(asyncio.to_thread(fn))
    return fn()


def _records(conn: Any, table: Any, owners: Iterable[str] | None) -> list[kt.KeyRecord]:
    """Provider-wrapped, not shredded keys of ``owners`` (all tables if None),
    newest first, in the order ``kt.find_active`` prefers them."""
    stmt = select(table).where(
        table.c.parent_id.is_(None), table.c.wrapped_key.is_not(None), table.c.status != kt.SHREDDED
    )
    if owners is not None:
        stmt = stmt.where(table.c.owner_table.in_(list(owners)))
    stmt = stmt.order_by(table.c.created_at.desc(), table.c.id.desc())
    return [kt.KeyRecord.from_row(row) for row in conn.execute(stmt)]


def warm(keys: KeyManager, tables: Iterable[str] | None = None) -> int:
    """Unwrap and cache the keys of ``tables`` (default: every table).

    Keys read here come from committed rows, so they are trusted for
    writing too (the rule of ``_manager``). Returns how many were loaded.
    """
    owners = None if tables is None else [getattr(t, "name", t) for t in tables]
    with keys.engine.connect() as conn:
        records = _records(conn, keys.table, owners)
        active: dict[tuple[str, str], int] = {}
        for record in records:
            keys._unwrap_and_cache(record, table=record.owner_table, column=None, conn=conn)
            if record.status == kt.ACTIVE:
                active.setdefault((record.owner_table, record.scope), record.id)  # newest first
    keys._active.update(active)
    return len(records)


async def warm_async(keys: KeyManager, tables: Iterable[str] | None = None) -> int:
    """:func:`warm` for asyncio: database reads awaited, provider calls in threads."""
    return await greenlet_spawn(warm, keys, tables)


async def create_table_async(keys: KeyManager) -> None:
    """Create the key table through an AsyncEngine (idempotent)."""
    await greenlet_spawn(keys.create_table)
