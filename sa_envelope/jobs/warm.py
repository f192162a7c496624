"""Cache warming: load the keys of some tables before the first request.

:func:`warm` unwraps the provider-wrapped keys of some tables at start-up,
so that first requests make no provider call at all. Rows the provider
refuses (untrusted wrapping key, metadata that does not authenticate) are
skipped: ``verify`` reports them. Write keys are then chosen by the store's
own rule (:mod:`sa_envelope.keys.choice`), from what was loaded. The ``_async`` variants run the same through
an ``AsyncEngine``'s greenlet bridge.
"""

from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy import Connection, Table, select
from sqlalchemy.util.concurrency import greenlet_spawn

from ..errors import DecryptionError, UnauthenticatedKeyError, UntrustedKeyError
from ..keys import table as kt
from ..keys.offload import require_greenlet
from ..keys.store import KeyStore

__all__ = ["create_table_async", "warm", "warm_async"]


def _records(conn: Connection, table: Table, owners: list[str] | None) -> list[kt.KeyRecord]:
    """Provider-wrapped, not shredded keys of ``owners`` (all tables if None),
    newest first, in the order ``kt.find_active`` prefers them."""
    stmt = select(table).where(kt.provider_wrapped(table), table.c.status != kt.SHREDDED)
    if owners is not None:
        stmt = stmt.where(table.c.owner_table.in_(owners))
    stmt = stmt.order_by(table.c.created_at.desc(), table.c.id.desc())
    return [kt.KeyRecord.from_row(row) for row in conn.execute(stmt)]


def warm(store: KeyStore, tables: Iterable[Any] | None = None) -> int:
    """Unwrap and cache the keys of ``tables`` (names or Tables; default all).
    Returns how many were loaded."""
    owners = None if tables is None else [getattr(t, "name", t) for t in tables]
    loaded = 0
    with store.engine.connect() as conn:
        records = _records(conn, store.table, owners)
        for record in records:
            try:
                store.unwrap_record(record, table=record.owner_table, column=None, conn=conn)
            except (UntrustedKeyError, UnauthenticatedKeyError, DecryptionError):
                continue
            loaded += 1
        current = {(r.owner_table, r.scope) for r in records if r.status == kt.ACTIVE}
        chosen = [(owner, scope, store.current(conn, owner, scope)) for owner, scope in sorted(current)]
    for owner, scope, found in chosen:
        if found is not None:
            store.trust(owner, scope, found[0].id)
    return loaded


async def warm_async(store: KeyStore, tables: Iterable[Any] | None = None) -> int:
    """:func:`warm` for asyncio: database reads awaited, provider calls in threads."""
    require_greenlet("warm_async")
    return await greenlet_spawn(warm, store, tables)


async def create_table_async(engine: Any, table: Table) -> None:
    """Create the key table through an AsyncEngine's sync engine (idempotent)."""
    require_greenlet("create_table_async")
    await greenlet_spawn(table.create, engine, checkfirst=True)
