"""UNIQUE on a deterministic column while its key is being rotated.

A database ``UNIQUE`` constraint compares bytes. During a rotation
(``keys.live``) one value may be stored under the old key in one row and
under the new key in another: two different byte strings, which the
constraint lets through. So after every INSERT or UPDATE that writes a
deterministic column of a unique constraint (on its own, or with other
columns: ``UniqueConstraint("tenant", "email")``) while the column has more
than one live key, this module checks, in the writer's transaction, that no
tuple written is now stored more than once across the live keys, and raises
:class:`~sa_envelope.errors.DuplicateValueError` if one is.

The race: two transactions write the same value under two keys, each checks
before the other commits, both pass. It is closed by **guard rows**: before
the write, the statement row-locks one row per (constraint, live key, sealed
value) in ``sa_envelope_guards``, in sorted order (PostgreSQL: ``INSERT ...
ON CONFLICT DO UPDATE``; MariaDB/MySQL: missing rows made on a connection of
their own, then ``SELECT ... FOR UPDATE``). Two writers of the
same value lock the same rows, so the later one waits until the earlier
one's transaction ends, then writes and reads with a locking read (``FOR SHARE``), which
sees the committed row even under InnoDB's REPEATABLE READ; PostgreSQL's
REPEATABLE READ refuses the upsert of a row changed since its snapshot
(a serialization failure: the application retries). Writers of different
values never wait for each other. A guard row holds a SHA-256 digest of the
value's ciphertext, no more than the column itself reveals (docs/format.md).
Where the guard table does not exist (a database made before it), the check
locks the key-table row of the oldest live key instead, serialising every
checked write of the table. SQLite serialises writers itself. Outside a
rotation (one live key) nothing is checked: the constraint is exact again.

Covered: every statement that writes the deterministic column. Not
covered: an UPDATE that changes only the other columns of a multi-column
constraint (docs/rotation.md).
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from typing import Any, Iterator

from sqlalchemy import (
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    and_,
    inspect,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.sql.elements import BindParameter, ClauseElement

from ..errors import DuplicateValueError
from ..keys.listeners import Listeners
from . import binds
from .encrypted import EncryptedType
from .livematch import Sealed

__all__ = ["GUARD_TABLE", "guard_table", "install", "unique_sets"]

GUARD_TABLE = "sa_envelope_guards"
_UNIQUE: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], ...]] = weakref.WeakKeyDictionary()
_HAS_GUARDS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()  # per engine, once found


def guard_table(metadata: MetaData, name: str = GUARD_TABLE) -> Table:
    """The guard rows' table: a digest per (constraint, key, sealed value)."""
    if name in metadata.tables:
        return metadata.tables[name]
    return Table(
        name,
        metadata,
        Column("guard", String(64), primary_key=True),  # hex SHA-256, see docs/format.md
        Column("owner_table", String(255), nullable=False),
    )


def _deterministic(column: Any) -> bool:
    return isinstance(column.type, EncryptedType) and bool(column.type.deterministic)


def unique_sets(table: Any) -> tuple[tuple[Any, ...], ...]:
    """The column tuples of ``table`` that are unique and hold a deterministic column."""
    found = _UNIQUE.get(table)
    if found is None:
        sets = [tuple(c.columns) for c in table.constraints if isinstance(c, UniqueConstraint)]
        sets += [tuple(i.columns) for i in table.indexes if isinstance(i, Index) and i.unique]
        sets += [(c,) for c in table.columns if c.unique]
        found = tuple(dict.fromkeys(s for s in sets if s and any(_deterministic(c) for c in s)))
        _UNIQUE[table] = found
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, BindParameter):
        value = value.effective_value
    return None if value is None or isinstance(value, (ClauseElement, Sealed)) else value


def _written(stmt: Any, column: Any, multiparams: Any, params: Any) -> Iterator[Any]:
    """Python values the statement wrote into ``column``."""
    for key, value in (stmt._values or {}).items():
        if getattr(key, "key", key) == column.key:
            yield _plain(value)
    for rows in stmt._multi_values:
        for row in rows:
            if isinstance(row, dict):
                yield from (_plain(v) for k, v in row.items() if getattr(k, "key", k) == column.key)
    for p in list(multiparams or ()) + ([params] if params else []):
        if isinstance(p, dict) and column.key in p:
            yield _plain(p[column.key])


def _others(stmt: Any, columns: tuple[Any, ...], multiparams: Any, params: Any) -> Any:
    """The rows to read, by the set's other columns as the statement wrote
    them (the unique index then serves the read, which locks only those), or
    None where some row leaves one of them to the database (an UPDATE of
    the deterministic column alone: every row holding the value is read)."""
    others = [c for c in columns if not _deterministic(c)]
    if not others:
        return None
    base = {getattr(k, "key", k): v for k, v in (stmt._values or {}).items()}
    rows = [
        {getattr(k, "key", k): v for k, v in r.items()} for g in stmt._multi_values for r in g if isinstance(r, dict)
    ]
    given = [p for p in list(multiparams or ()) + ([params] if params else []) if isinstance(p, dict)]
    rows += [{**base, **p} for p in given] or ([base] if base else [])
    tuples = {tuple(_plain(r.get(c.key)) for c in others) for r in rows}
    if not tuples or any(v is None for t in tuples for v in t):
        return None
    return or_(*(and_(*(c == v for c, v in zip(others, t))) for t in tuples))


def _targets(stmt: Any, multiparams: Any, params: Any) -> Iterator[tuple[tuple[Any, ...], dict[Any, Any], Any]]:
    """(unique set, its written values sealed under every live key, the narrowing) per set to check."""
    if not (getattr(stmt, "is_insert", False) or getattr(stmt, "is_update", False)):
        return
    table = getattr(stmt, "table", None)
    if table is None or not hasattr(table, "constraints"):
        return
    for columns in unique_sets(table):
        written: dict[Any, dict[bytes, Any]] = {}
        for column in (c for c in columns if _deterministic(c)):
            live = column.type.live_keys()
            values = {v for v in _written(stmt, column, multiparams, params) if v is not None}
            if len(live) > 1 and values:
                written[column] = {column.type.encrypt(Sealed(v, k)): v for v in values for k in live}
        if written:
            yield columns, written, _others(stmt, columns, multiparams, params)


def _guard(conn: Any, stmt: Any, multiparams: Any, params: Any, execution_options: Any) -> None:
    """Before the write: lock the guards (InnoDB's locking read after the
    write would wait for the other writer's new row while it waits for our
    guard: a deadlock; so the lock comes first, on every backend)."""
    if conn.dialect.name == "sqlite":
        return
    for columns, written, _ in _targets(stmt, multiparams, params):
        _lock(conn, columns[0].table, columns, written)


def _check(conn: Any, stmt: Any, multiparams: Any, params: Any, *_: Any) -> None:
    """After the write, in its transaction: the values written are stored once."""
    for columns, written, narrow in _targets(stmt, multiparams, params):
        _check_set(conn, columns, written, narrow)


def _check_set(conn: Any, columns: tuple[Any, ...], written: dict[Any, dict[bytes, Any]], narrow: Any = None) -> None:
    """Refuse if a tuple holding a value just written is stored twice across keys."""
    table = columns[0].table
    raw = {c: type_coerce(c, LargeBinary) if _deterministic(c) else c for c in columns}
    stmt = select(*raw.values()).where(or_(*(raw[c].in_(list(sealed)) for c, sealed in written.items())))
    if narrow is not None:
        stmt = stmt.where(narrow)
    if conn.dialect.name != "sqlite":
        stmt = stmt.with_for_update(read=True)
    seen: set[tuple[Any, ...]] = set()
    for row in conn.execute(stmt):
        found = tuple(_canonical(conn, c, v, written) for c, v in zip(columns, row))
        if any(v is None for v in found):
            continue  # NULL is distinct from everything, as in the constraint
        if found in seen:
            names = ", ".join(c.name for c in columns)
            raise DuplicateValueError(
                f"{table.name}({names}) is unique: the value written is already stored under another "
                "live key of the column (a rotation is in progress)",
                table=table.name,
                column=next(iter(written)).name,
            )
        seen.add(found)


def _canonical(conn: Any, column: Any, stored: Any, written: dict[Any, dict[bytes, Any]]) -> Any:
    """A stored value as compared: a deterministic one by its plaintext, whatever its key."""
    if stored is None or not _deterministic(column):
        return stored
    data = bytes(stored)
    known = written.get(column, {})
    if data in known:
        return ("value", known[data])
    return ("value", column.type.decrypt(data, binds.require(column.type, conn.dialect)))


def _lock(conn: Any, table: Any, columns: tuple[Any, ...], written: dict[Any, dict[bytes, Any]]) -> None:
    """Row-lock the guards of the values written (or, without the guard table, the key row)."""
    if not _has_guards(conn):
        keys = next(iter(written)).type.keys.table
        oldest = min(k.key_id for c in written for k in c.type.live_keys())
        conn.execute(select(keys.c.id).where(keys.c.id == oldest).with_for_update()).all()
        return
    names = ",".join(c.name for c in columns).encode()
    digests = sorted(
        {
            hashlib.sha256(b"sa-envelope guard\0" + table.name.encode() + b"\0" + names + b"\0" + sealed).hexdigest()
            for sealed in itertools.chain.from_iterable(written.values())
        }
    )
    guards = guard_table(MetaData())
    rows = [{"guard": d, "owner_table": table.name} for d in digests]
    if conn.dialect.name == "postgresql":  # the upsert changes the row: a REPEATABLE READ writer after us fails
        pg = postgresql.insert(guards).values(rows)
        conn.execute(pg.on_conflict_do_update(index_elements=["guard"], set_={"owner_table": pg.excluded.owner_table}))
        return
    # InnoDB: two transactions upserting the same new rows deadlock on their gap locks; so the
    # missing guards are made on a connection of their own (committed at once, locking nothing
    # of ours), then the existing rows are locked in order; locking reads see the newest rows
    with conn.engine.connect() as side:
        have = set(side.execute(select(guards.c.guard).where(guards.c.guard.in_(digests))).scalars())
        if len(have) < len(digests):
            side.execute(mysql.insert(guards).prefix_with("IGNORE"), [r for r in rows if r["guard"] not in have])
            side.commit()
    locked = select(guards.c.guard).where(guards.c.guard.in_(digests)).order_by(guards.c.guard).with_for_update()
    conn.execute(locked).all()


def _has_guards(conn: Any) -> bool:
    engine = conn.engine
    if _HAS_GUARDS.get(engine):
        return True
    found = bool(inspect(conn).has_table(GUARD_TABLE))
    if found:
        _HAS_GUARDS[engine] = True
    return found


def install(listeners: Listeners) -> None:
    """Guard unique deterministic columns before each write on the engine of
    ``listeners`` and check them after (once per engine, however many
    managers are bound to it)."""
    listeners.share("before_execute", _guard)
    listeners.share("after_execute", _check)
