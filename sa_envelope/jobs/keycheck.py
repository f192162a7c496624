"""Key-table anomalies: what a database writer may have planted or changed.

The store already refuses such rows as write keys (:mod:`sa_envelope.keys.choice`);
this names them, each with its key id, so that ``verify`` can report them and
exit non-zero:

* a key wrapped by a CMK the provider does not trust (planted, or a CMK
  missing from ``previous``);
* metadata that does not authenticate (a relabelled scope, owner, algorithm
  or created time), or key context version 1, which authenticates none of
  them (``rewrap`` upgrades it);
* a ``created_at`` in the future;
* more than one current key of one (owner, scope);
* a row key whose parent key is missing.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

from sqlalchemy import Connection, select

from ..envelope import format as fmt
from ..errors import DecryptionError, KeyNotFoundError, UnauthenticatedKeyError, UntrustedKeyError
from ..keys import choice
from ..keys import table as kt
from ..keys.store import KeyStore
from ..providers.base import CONTEXT_VERSION

__all__ = ["Anomaly", "key_anomalies"]

Anomaly = tuple[str, str]  # (key id, what is wrong)


def _provider_key(store: KeyStore, conn: Connection, record: kt.KeyRecord) -> str | None:
    """What is wrong with one provider-wrapped key row, or ``None``."""
    if not store.provider.trusts(record.wrapping_key_id):
        return f"wrapped by untrusted key {record.wrapping_key_id} ({record.scope} key of {record.owner_table})"
    if choice.in_future(record, kt.utcnow()):
        return f"created_at {record.created_at} is in the future"
    try:
        store.unwrap_record(record, table=record.owner_table, column=None, conn=conn)
    except (UntrustedKeyError, UnauthenticatedKeyError, DecryptionError) as exc:
        return f"metadata does not authenticate: {exc}"
    if choice.version_of(record) < CONTEXT_VERSION:
        return "key context version 1 does not authenticate scope, algorithm or created time (run rewrap)"
    return None


def _orphans(conn: Connection, store: KeyStore, owners: set[str] | None) -> list[Anomaly]:
    """Row keys whose parent key row is missing."""
    t = store.table
    parent = t.alias("parent")
    stmt = (
        select(t.c.id, t.c.parent_id, t.c.owner_table)
        .outerjoin(parent, parent.c.id == t.c.parent_id)
        .where(t.c.parent_id.is_not(None), parent.c.id.is_(None))
    )
    return [
        (fmt.format_key_id(key_id), f"row key of {owner}: its parent key {fmt.format_key_id(parent_id)} is missing")
        for key_id, parent_id, owner in conn.execute(stmt)
        if owners is None or owner in owners
    ]


def key_anomalies(store: KeyStore, tables: Iterable[str] | None = None) -> list[Anomaly]:
    """Every anomaly of the key table (of ``tables``' keys only, if given)."""
    owners = set(tables) if tables else None
    found: list[Anomaly] = []
    current: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
    t = store.table
    with store.engine.connect() as conn, store.tracker.use_connection(conn):
        for row in conn.execute(select(t).where(kt.provider_wrapped(t)).order_by(t.c.id)):
            record = kt.KeyRecord.from_row(row)
            if owners is not None and record.owner_table not in owners:
                continue
            try:
                reason = _provider_key(store, conn, record)
            except KeyNotFoundError as exc:
                reason = str(exc)
            if reason is not None:
                found.append((fmt.format_key_id(record.id), reason))
            elif record.status == kt.ACTIVE:
                current[(record.owner_table, record.scope)].append(fmt.format_key_id(record.id))
        found.extend(_orphans(conn, store, owners))
    for (owner, scope), ids in sorted(current.items()):
        if len(ids) > 1:
            found.extend((i, f"one of {len(ids)} current {scope} keys of {owner}: {', '.join(ids)}") for i in ids)
    return found
