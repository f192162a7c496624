"""Guard rows: the lock points that serialise writers of one unique value.

:mod:`.uniqueness` checks UNIQUE on a deterministic column across its live
keys after each write; two writers of one value under two keys would each
check before the other commits. So before its write each locks one row per
(constraint, live key, sealed value) in the guard table beside the column's
key table (``sa_envelope_guards`` beside ``sa_envelope_keys``, ``x_guards``
beside a key table named ``x_keys`` or ``x``: :func:`guard_table_name`, as
the token table follows it), in sorted order: writers of the same value lock the same rows and the later waits for
the earlier's transaction to end. A guard row is a SHA-256 digest of a
ciphertext the column itself would hold (docs/format.md) and the owner of
the column's keys.

Guards matter only while a column has more than one live key: the
re-encryption job deletes a table's guards when it retires the old key, and
the guard sweep (:mod:`sa_envelope.jobs.guardsweep`) those left after it
(:func:`remove_settled`). A writer that still holds a guard lock makes that
DELETE wait; a writer that comes after it makes the guards again (PostgreSQL
upserts them, which locks the row it makes; MariaDB/MySQL makes the missing
ones on a connection of its own, then locks them and makes them again while
one is missing), so removing them never lets two writers of a value through.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from typing import Any

from sqlalchemy import Column, Index, MetaData, String, Table, delete, func, inspect, select
from sqlalchemy.dialects import mysql, postgresql

from ..keys.live import LIVE_STATUSES
from ..keys.table import KEY_TABLE_NAME, SCOPE_DETERMINISTIC

__all__ = [
    "GUARD_TABLE",
    "guard_owners",
    "guard_table",
    "guard_table_name",
    "guards_of",
    "has_guards",
    "lock",
    "remove_guards",
    "remove_settled",
]

GUARD_TABLE = "sa_envelope_guards"
_HAS_GUARDS: weakref.WeakKeyDictionary[Any, set[tuple[str | None, str]]] = weakref.WeakKeyDictionary()  # per engine
_CHUNK = 1000  # guards per statement (PostgreSQL takes at most 65,535 parameters)
_BESIDE: weakref.WeakKeyDictionary[Table, Table] = weakref.WeakKeyDictionary()  # key table -> its guard table


def guard_table_name(key_table_name: str = KEY_TABLE_NAME) -> str:
    """``sa_envelope_keys`` -> ``sa_envelope_guards``; ``x_keys`` or ``x`` -> ``x_guards``."""
    return key_table_name.removesuffix("_keys") + "_guards"


def guard_table(metadata: MetaData, key_table_name: str = KEY_TABLE_NAME) -> Table:
    """The guard rows' table beside the key table ``key_table_name`` (in
    ``metadata``'s schema): a digest per (constraint, key, sealed value),
    indexed by owner so that a finished rotation removes its own in bulk."""
    name = guard_table_name(key_table_name)
    key = f"{metadata.schema}.{name}" if metadata.schema else name
    if key in metadata.tables:
        return metadata.tables[key]
    return Table(
        name,
        metadata,
        Column("guard", String(64), primary_key=True),  # hex SHA-256, see docs/format.md
        Column("owner_table", String(255), nullable=False),
        Index(f"ix_{name}_owner_table", "owner_table"),
    )


def guards_of(keys: Table) -> Table:
    """The guard table beside the key table ``keys``: its name follows the key
    table's, in the key table's schema (made once per key table)."""
    found = _BESIDE.get(keys)
    if found is None:
        found = _BESIDE[keys] = guard_table(MetaData(schema=keys.schema), keys.name)
    return found


def _digests(table: Any, columns: tuple[Any, ...], written: dict[Any, dict[bytes, Any]]) -> list[str]:
    names = ",".join(c.name for c in columns).encode()
    head = b"sa-envelope guard\0" + table.name.encode() + b"\0" + names + b"\0"
    sealed = itertools.chain.from_iterable(written.values())
    return sorted({hashlib.sha256(head + s).hexdigest() for s in sealed})


def lock(conn: Any, table: Any, columns: tuple[Any, ...], written: dict[Any, dict[bytes, Any]]) -> None:
    """Row-lock the guards of the values written (or, without the guard table, the key row)."""
    keys = next(iter(written)).type.keys.table
    guards = guards_of(keys)
    if not has_guards(conn, guards):
        oldest = min(k.key_id for c in written for k in c.type.live_keys())
        conn.execute(select(keys.c.id).where(keys.c.id == oldest).with_for_update()).all()
        return
    digests = _digests(table, columns, written)
    owner = next(iter(written)).type.bound_context.rpartition(".")[0]  # the owner of the column's keys
    chunks = [digests[i : i + _CHUNK] for i in range(0, len(digests), _CHUNK)]  # in order: the lock order holds
    if conn.dialect.name == "postgresql":
        for chunk in chunks:
            _lock_upserted(conn, guards, [{"guard": d, "owner_table": owner} for d in chunk])
        return
    rows = [[{"guard": d, "owner_table": owner} for d in chunk] for chunk in chunks]
    with conn.engine.connect() as side:  # all made first: our locks on one chunk would hold up the next's
        for chunk_rows in rows:
            _make_missing(side, guards, chunk_rows)
    for chunk_rows in rows:
        _lock_innodb(conn, guards, chunk_rows)


def _lock_upserted(conn: Any, guards: Table, rows: list[dict[str, str]]) -> None:
    """PostgreSQL: the upsert changes the row: a REPEATABLE READ writer after us fails."""
    pg = postgresql.insert(guards).values(rows)
    conn.execute(pg.on_conflict_do_update(index_elements=["guard"], set_={"owner_table": pg.excluded.owner_table}))


def _make_missing(side: Any, guards: Table, rows: list[dict[str, str]]) -> None:
    """InnoDB: two transactions upserting the same new rows deadlock on their
    gap locks; so the missing guards are made on a connection of their own
    (``side``: committed at once, locking nothing of ours)."""
    digests = [r["guard"] for r in rows]
    have = set(side.execute(select(guards.c.guard).where(guards.c.guard.in_(digests))).scalars())
    if len(have) < len(digests):
        side.execute(mysql.insert(guards).prefix_with("IGNORE"), [r for r in rows if r["guard"] not in have])
    side.commit()  # also ends the snapshot: the next chunk sees the newest rows


def _lock_innodb(conn: Any, guards: Table, rows: list[dict[str, str]]) -> None:
    """Lock the existing guards in order (locking reads see the newest rows).
    A guard removed in between (remove_guards) leaves our gap lock where it
    was: the side connection would wait for us, so we make it ourselves (a
    deadlock with a writer doing the same is refused by InnoDB at once: one
    of them rolls back, neither passes unlocked)."""
    digests = [r["guard"] for r in rows]
    stmt = select(guards.c.guard).where(guards.c.guard.in_(digests)).order_by(guards.c.guard).with_for_update()
    locked = set(conn.execute(stmt).scalars())
    while len(locked) < len(digests):
        conn.execute(mysql.insert(guards).prefix_with("IGNORE"), [r for r in rows if r["guard"] not in locked])
        locked = set(conn.execute(stmt).scalars())


def has_guards(conn: Any, guards: Table) -> bool:
    """Whether the guard table ``guards`` exists (remembered per engine once it does)."""
    engine, where = conn.engine, (guards.schema, guards.name)
    known = _HAS_GUARDS.setdefault(engine, set())
    if where in known:
        return True
    found = bool(inspect(conn).has_table(guards.name, schema=guards.schema))
    if found:
        known.add(where)
    return found


def remove_guards(conn: Any, keys: Table, owner: str) -> int:
    """Delete the guards of ``owner``'s columns from the guard table beside
    the key table ``keys`` (call once it has one live deterministic key:
    nothing checks or locks them then); the number removed."""
    guards = guards_of(keys)
    if not has_guards(conn, guards):
        return 0
    return int(conn.execute(delete(guards).where(guards.c.owner_table == owner)).rowcount)


def guard_owners(conn: Any, keys: Table) -> list[str]:
    """The owners (``owner_table``) that have guard rows beside the key table ``keys``."""
    guards = guards_of(keys)
    if not has_guards(conn, guards):
        return []
    return sorted(conn.execute(select(guards.c.owner_table).distinct()).scalars())


def remove_settled(conn: Any, keys: Table, owner: str, *, dry_run: bool = False) -> tuple[bool, int]:
    """Delete ``owner``'s guards if no rotation of its deterministic key is in
    progress (at most one live deterministic key), in ``conn``'s transaction;
    (whether they were, the number of its guards removed or, with
    ``dry_run`` or a rotation in progress, counted and left).

    Safe against a rotation starting meanwhile: the live key rows are read
    with a row lock (:func:`_live_keys`), which ``rotate_table_key`` takes
    too (on the active key: keys.rollover ``lock_active``) before it makes
    the new key. Either we lock first, and the rotation's new key, and so
    every guard a writer makes for it (a writer makes them only once it sees
    two live keys), comes after our commit; or the rotation commits first,
    and our second read sees its key: two live keys, nothing removed. A
    guard a writer holds makes the DELETE wait for it; one removed is made
    again by the next writer of its value (module doc). SQLite: no guard is
    locked or made there (it serialises writers), nothing to race with."""
    guards = guards_of(keys)
    if not has_guards(conn, guards):
        return True, 0
    settled = _live_keys(conn, keys, owner) <= 1
    if settled and not dry_run:
        return True, remove_guards(conn, keys, owner)
    count = select(func.count()).select_from(guards).where(guards.c.owner_table == owner)
    return settled, int(conn.execute(count).scalar_one())


def _live_keys(conn: Any, keys: Table, owner: str) -> int:
    """How many live deterministic keys ``owner`` has, read twice with a row
    lock: the first read waits for a rotation holding the active key's row
    to commit; the second, a statement of its own (READ COMMITTED's fresh
    snapshot; InnoDB's locking reads see the newest rows anyway), also sees
    the key it committed."""
    stmt = select(keys.c.id).where(
        keys.c.owner_table == owner, keys.c.scope == SCOPE_DETERMINISTIC, keys.c.status.in_(LIVE_STATUSES)
    )
    if conn.dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    conn.execute(stmt).all()
    return len(conn.execute(stmt).all())
