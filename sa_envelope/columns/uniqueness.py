"""UNIQUE on a deterministic column while its key is being rotated.

A database ``UNIQUE`` constraint compares bytes. During a rotation
(``keys.live``) one value may be stored under the old key in one row and
under the new key in another: two different byte strings, which the
constraint lets through. So after every INSERT or UPDATE that writes a
column of a unique constraint holding a deterministic column (on its own,
or with others: ``UniqueConstraint("tenant", "email")``) while that column
has more than one live key, this module checks, in the writer's
transaction, that no tuple written is now stored more than once across the
live keys, and raises :class:`~sa_envelope.errors.DuplicateValueError` if
one is.

An UPDATE that writes only the *other* columns of the set (``SET tenant =
1``) has no deterministic value in it: before it runs, the values its rows
keep are read by its WHERE clause (per parameter set, row-locked as the
UPDATE would lock them; SQLite's write lock is taken first) and checked
like written ones. If the UPDATE then changes more rows than were read (a
row committed in between began to match: PostgreSQL's READ COMMITTED), it
is refused with
:class:`~sa_envelope.errors.UncheckedUpdateError`; an executemany by its
total (the drivers report one sum over its parameter sets) where the
dialect's sum is reliable (not asyncpg's).

The race: two transactions write the same value under two keys, each checks
before the other commits, both pass. It is closed by the guard rows of
:mod:`.guardrows`, locked before the write (for the values written and the
values kept alike); the later writer waits for the earlier one's transaction
to end, then writes and reads with a locking read (``FOR SHARE``), which
sees the committed row even under InnoDB's REPEATABLE READ; PostgreSQL's
REPEATABLE READ refuses the upsert of a guard changed since its snapshot
(a serialization failure: the application retries). Writers of different
values never wait for each other. SQLite serialises writers itself. Outside
a rotation (one live key) nothing is read, locked or checked: the
constraint is exact again (docs/rotation.md).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

from sqlalchemy import Index, LargeBinary, Table, UniqueConstraint, and_, or_, select, type_coerce
from sqlalchemy.sql import operators as ops
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, ClauseElement
from sqlalchemy.sql.selectable import Alias, Exists, ScalarSelect, SelectBase

from ..errors import DuplicateValueError, UncheckedUpdateError
from ..keys.listeners import Listeners
from . import binds
from .encrypted import EncryptedType
from .guardrows import lock
from .livematch import Sealed

__all__ = ["CHUNK", "install", "unique_sets"]

CHUNK = 1000  # values per check statement, guards per lock statement (PostgreSQL: <= 65,535 parameters)
_UNIQUE: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], ...]] = weakref.WeakKeyDictionary()
_PENDING = "sa_envelope.unique_pending"  # conn.info: id(statement) -> (statement, its targets) till it ends


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


def _rows(stmt: Any, multiparams: Any, params: Any) -> list[dict[str, Any]]:
    """The statement's rows as column key -> value, its own values merged into each parameter set."""
    base = {getattr(k, "key", k): v for k, v in (stmt._values or {}).items()}
    rows = [
        {getattr(k, "key", k): v for k, v in r.items()} for g in stmt._multi_values for r in g if isinstance(r, dict)
    ]
    given = [p for p in list(multiparams or ()) + ([params] if params else []) if isinstance(p, dict)]
    return rows + ([{**base, **p} for p in given] or ([base] if base else []))


def _others(stmt: Any, columns: tuple[Any, ...], multiparams: Any, params: Any) -> Any:
    """The rows to read, by the set's other columns as the statement wrote
    them (the unique index then serves the read, which locks only those), or
    None where some row leaves one of them to the database (an UPDATE of
    the deterministic column alone: every row holding the value is read)."""
    others = [c for c in columns if not _deterministic(c)]
    if not others:
        return None
    tuples = {tuple(_plain(r.get(c.key)) for c in others) for r in _rows(stmt, multiparams, params)}
    if not tuples or len(tuples) > CHUNK or any(v is None for t in tuples for v in t):
        return None  # many rows: every row holding a value is read, in chunks
    return or_(*(and_(*(c == v for c, v in zip(others, t))) for t in tuples))


def _kept(
    conn: Any, stmt: Any, columns: tuple[Any, ...], multiparams: Any, params: Any
) -> tuple[dict[Any, set[Any]], int]:
    """For an UPDATE that writes some columns of the set but not each
    deterministic one: the values those keep, read (row-locked, as the
    UPDATE would lock them) from the rows its WHERE clause selects, per
    parameter set, before it runs (after it, the WHERE may match others);
    and the number of distinct rows read, by primary key (-1: none read)."""
    if not getattr(stmt, "is_update", False):
        return {}, -1
    rows = _rows(stmt, multiparams, params)
    written = {c for c in columns if any(c.key in r for r in rows)}
    kept = [c for c in columns if _deterministic(c) and c not in written]
    if not written or not kept:
        return {}, -1
    sets = [p for p in list(multiparams or ()) + [params or {}] if isinstance(p, dict) and p] or [{}]
    primary = list(stmt.table.primary_key.columns)
    _refuse_unreadable(conn, stmt, columns, primary, len(sets) > 1)
    read = select(*primary, *(type_coerce(c, LargeBinary) for c in kept))
    if stmt.whereclause is not None:
        read = read.where(stmt.whereclause)
    if conn.dialect.name != "sqlite":
        read = read.with_for_update()
    else:
        _lock_sqlite(conn, stmt.table)
    found: dict[Any, set[Any]] = {c: set() for c in kept}
    seen: set[tuple[Any, ...]] = set()
    empty = False
    for p in sets:
        got = conn.execute(read, p).all()
        empty = empty or not got
        for row in got:
            seen.add(tuple(row[: len(primary)]))
            for column, stored in zip(kept, row[len(primary) :]):
                if stored is not None:
                    found[column].add(column.type.decrypt(bytes(stored), binds.require(column.type, conn.dialect)))
    if len(sets) > 1 and not conn.dialect.supports_sane_multi_rowcount and (empty or not _by_key(stmt, primary)):
        raise _unchecked(stmt, columns, _NO_SUM)
    return found, len(seen)


def _refuse_unreadable(conn: Any, stmt: Any, columns: tuple[Any, ...], primary: list[Any], many: bool) -> None:
    """Refuse, before it runs, an UPDATE whose rows the read cannot pin down.

    The rows read are locked, and so are the rows of other tables its WHERE
    joins (``UPDATE ... FROM``: ``FOR UPDATE`` locks every table of the read),
    so no row read can stop matching and a row that begins to match shows in
    the row count. A subquery's rows are not locked (neither PostgreSQL's nor
    InnoDB's locking read reaches into it): one row could leave the WHERE
    while another joins it, unseen by the count. SQLite holds its write lock
    from before the read: nothing changes in between there. Rows are told
    apart by primary key (a join reads a row once per partner)."""
    where = stmt.whereclause
    if where is None:
        return
    if not primary and (many or any(f is not stmt.table for f in where._from_objects)):
        raise _unchecked(stmt, columns, "its table has no primary key to tell the rows read apart")
    if conn.dialect.name == "sqlite":
        return
    nested = any(isinstance(e, (SelectBase, ScalarSelect, Exists)) for e in visitors.iterate(where))
    foreign = [f for f in where._from_objects if f is not stmt.table and not isinstance(f, (Table, Alias))]
    if nested or foreign or any(isinstance(f, Alias) and not isinstance(f.element, Table) for f in where._from_objects):
        raise _unchecked(stmt, columns, _SUBQUERY)


def _by_key(stmt: Any, primary: list[Any]) -> bool:
    """The WHERE clause is ``pk = :value`` for every primary-key column (the
    ORM's): at most one row can match each parameter set."""
    where = stmt.whereclause
    terms = list(where.clauses) if isinstance(where, BooleanClauseList) and where.operator is ops.and_ else [where]
    equal = {
        t.left._deannotate()
        for t in terms
        if isinstance(t, BinaryExpression) and t.operator is ops.eq and isinstance(t.right, BindParameter)
    }
    return bool(primary) and all(any(c is p for c in equal) for p in primary)


_SUBQUERY = (
    "its WHERE clause reads a subquery, whose rows the check cannot lock; select the primary keys first "
    "and update by them"
)
_NO_SUM = (
    "the driver reports no row count for an executemany; run the parameter sets as separate statements "
    "or update by primary key"
)


def _unchecked(stmt: Any, columns: tuple[Any, ...], why: str) -> UncheckedUpdateError:
    names = ", ".join(c.name for c in columns)
    return UncheckedUpdateError(
        f"{stmt.table.name}({names}) is unique and a rotation is in progress: this UPDATE cannot be checked "
        f"across the live keys, since {why}",
        table=stmt.table.name,
        column=next(c for c in columns if _deterministic(c)).name,
    )


def _lock_sqlite(conn: Any, table: Any) -> None:
    """SQLite has no ``FOR UPDATE`` and pysqlite begins the write only at the
    UPDATE: another writer could change or add a row between our read and
    it. A write that changes nothing takes the database's write lock first
    (a plain string: no listener of ours rewrites or checks it)."""
    prep = conn.dialect.identifier_preparer
    name = prep.quote(next(iter(table.c)).name)
    conn.exec_driver_sql(f"UPDATE {prep.format_table(table)} SET {name} = {name} WHERE 0")


def _targets(
    conn: Any, stmt: Any, multiparams: Any, params: Any
) -> Iterator[tuple[tuple[Any, ...], dict[Any, Any], Any, int]]:
    """(unique set, the values it writes or keeps sealed under every live key,
    the narrowing, the rows read for the values kept or -1) per set to check."""
    if not (getattr(stmt, "is_insert", False) or getattr(stmt, "is_update", False)):
        return
    table = getattr(stmt, "table", None)
    if table is None or not hasattr(table, "constraints"):
        return
    for columns in unique_sets(table):
        if all(len(c.type.live_keys()) < 2 for c in columns if _deterministic(c)):
            continue
        kept, read = _kept(conn, stmt, columns, multiparams, params)
        written: dict[Any, dict[bytes, Any]] = {}
        for column in (c for c in columns if _deterministic(c)):
            live = column.type.live_keys()
            values = {v for v in _written(stmt, column, multiparams, params) if v is not None}
            values |= kept.get(column, set())
            if len(live) > 1 and values:
                store = binds.require(column.type, conn.dialect).store  # this engine's (of several bound)
                written[column] = {column.type.encrypt(Sealed(v, k), store): v for v in values for k in live}
        if written:
            yield columns, written, _others(stmt, columns, multiparams, params), read


def _guard(conn: Any, stmt: Any, multiparams: Any, params: Any, execution_options: Any) -> None:
    """Before the write: find what to check and lock its guards (InnoDB's
    locking read after the write would wait for the other writer's new row
    while it waits for our guard: a deadlock; so the lock comes first)."""
    targets = list(_targets(conn, stmt, multiparams, params))
    if not targets:
        return
    if conn.dialect.name != "sqlite":  # SQLite serialises writers itself
        for columns, written, _, _ in targets:
            lock(conn, columns[0].table, columns, written)
    conn.info.setdefault(_PENDING, {})[id(stmt)] = (stmt, targets)  # statements may run within it (key rows)


def _check(conn: Any, stmt: Any, multiparams: Any, params: Any, options: Any, result: Any) -> None:
    """After the write, in its transaction: the values written (or kept) are stored once."""
    pending = conn.info.get(_PENDING, {}).pop(id(stmt), None)
    if pending is None or pending[0] is not stmt:
        return
    for columns, written, narrow, read in pending[1]:
        _check_read_all(conn, stmt, columns, multiparams, read, result)
        _check_set(conn, columns, written, narrow)


def _check_read_all(conn: Any, stmt: Any, columns: tuple[Any, ...], multiparams: Any, read: int, result: Any) -> None:
    """Refuse an UPDATE that changed more rows than the distinct rows read for
    the values they keep: a row began to match its WHERE in between (another
    transaction's commit, under READ COMMITTED). An executemany's count is
    the sum over its parameter sets (psycopg, PyMySQL, sqlite3). Every row
    read is locked, so each is changed by some set (its own, or an earlier
    one that moved it out of the WHERE): a sum at most the distinct rows
    read leaves none unread (an earlier set moving a row out of a later
    set's WHERE while another writer's row joins it adds one to the sum).
    A dialect without a reliable sum (asyncpg) was refused before the write
    unless each set updated by primary key a row it read (:func:`_kept`)."""
    many = len(multiparams or ()) > 1
    if read < 0 or (many and not conn.dialect.supports_sane_multi_rowcount):
        return
    if getattr(result, "rowcount", -1) <= read:
        return
    raise _unchecked(stmt, columns, _JOINED)


_JOINED = (
    "it changed rows that began to match its WHERE clause while their values were being checked (or, in an "
    "executemany, a row more than once); roll back and retry"
)


def _check_set(conn: Any, columns: tuple[Any, ...], written: dict[Any, dict[bytes, Any]], narrow: Any = None) -> None:
    """Refuse if a tuple holding a value just written is stored twice across
    keys. The values go in chunks (a statement holds at most 65,535
    parameters on PostgreSQL): a row found by more than one chunk is told
    apart by its primary key."""
    table = columns[0].table
    primary = list(table.primary_key.columns)
    raw = {c: type_coerce(c, LargeBinary) if _deterministic(c) else c for c in columns}
    pairs = [(c, sealed) for c, values in written.items() for sealed in values]
    size = CHUNK if primary else len(pairs)
    seen: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # tuple -> the row holding it
    for start in range(0, len(pairs), size):
        chunk = pairs[start : start + size]
        where = or_(*(raw[c].in_([v for k, v in chunk if k is c]) for c in dict.fromkeys(k for k, _ in chunk)))
        stmt = select(*primary, *raw.values()).where(where)
        if narrow is not None:
            stmt = stmt.where(narrow)
        if conn.dialect.name != "sqlite":
            stmt = stmt.with_for_update(read=True)
        for row in conn.execute(stmt):
            key = tuple(row[: len(primary)]) if primary else (object(),)
            found = tuple(_canonical(conn, c, v, written) for c, v in zip(columns, row[len(primary) :]))
            if any(v is None for v in found):
                continue  # NULL is distinct from everything, as in the constraint
            if seen.setdefault(found, key) != key:
                names = ", ".join(c.name for c in columns)
                raise DuplicateValueError(
                    f"{table.name}({names}) is unique: the value written is already stored under another "
                    "live key of the column (a rotation is in progress)",
                    table=table.name,
                    column=next(iter(written)).name,
                )


def _canonical(conn: Any, column: Any, stored: Any, written: dict[Any, dict[bytes, Any]]) -> Any:
    """A stored value as compared: a deterministic one by its plaintext, whatever its key."""
    if stored is None or not _deterministic(column):
        return stored
    data = bytes(stored)
    known = written.get(column, {})
    if data in known:
        return ("value", known[data])
    return ("value", column.type.decrypt(data, binds.require(column.type, conn.dialect)))


def _forget(context: Any) -> None:
    """A statement failed: drop its pending check (it holds written values)."""
    stmt = getattr(context.execution_context, "invoked_statement", None)
    if context.connection is not None and stmt is not None:
        context.connection.info.get(_PENDING, {}).pop(id(stmt), None)


def install(listeners: Listeners) -> None:
    """Guard unique deterministic columns before each write on the engine of
    ``listeners`` and check them after (once per engine, however many
    managers are bound to it)."""
    listeners.share("before_execute", _guard)
    listeners.share("after_execute", _check)
    listeners.share("handle_error", _forget)
