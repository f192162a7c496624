"""UNIQUE on a deterministic column while its key is being rotated.

A database ``UNIQUE`` constraint compares bytes. During a rotation
(``keys.live``) one value may be stored under the old key in one row and
under the new key in another: two different byte strings, which the
constraint lets through. So after every INSERT or UPDATE that writes a
unique deterministic column while it has more than one live key, this
module checks, in the writer's transaction, that no value written is now
stored more than once under any of the live keys, and raises
:class:`~sa_envelope.errors.DuplicateValueError` if one is.

The race (two transactions writing the same value under the two keys, each
checking before the other commits) is closed by a lock row: each check
first locks the key-table row of the oldest live key (``SELECT ... FOR
UPDATE``), so the checks run one after the other, the later one after the
earlier committed; and it reads with a locking read (``FOR SHARE``), which
sees the newest committed rows even under InnoDB's REPEATABLE READ. On
SQLite the write itself holds the database's one write lock. Outside a
rotation (one live key) nothing is checked: the constraint is exact again.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator

from sqlalchemy import LargeBinary, UniqueConstraint, select, type_coerce
from sqlalchemy.sql.elements import BindParameter, ClauseElement

from ..errors import DuplicateValueError
from ..keys.listeners import Listeners
from .encrypted import EncryptedType
from .livematch import Sealed

__all__ = ["install", "unique_columns"]

_UNIQUE: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def unique_columns(table: Any) -> tuple[Any, ...]:
    """The deterministic columns of ``table`` that are unique on their own."""
    found = _UNIQUE.get(table)
    if found is None:
        single = {
            tuple(c.columns)[0] for c in table.constraints if isinstance(c, UniqueConstraint) and len(c.columns) == 1
        }
        single |= {tuple(i.columns)[0] for i in table.indexes if i.unique and len(i.columns) == 1}
        found = tuple(
            c
            for c in table.columns
            if isinstance(c.type, EncryptedType) and c.type.deterministic and (c.unique or c in single)
        )
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


def _check(conn: Any, stmt: Any, multiparams: Any, params: Any, *_: Any) -> None:
    if not (getattr(stmt, "is_insert", False) or getattr(stmt, "is_update", False)):
        return
    table = getattr(stmt, "table", None)
    if table is None or not hasattr(table, "constraints"):
        return
    for column in unique_columns(table):
        ctype = column.type
        live = ctype.live_keys()
        if len(live) < 2:
            continue  # no rotation: the database's UNIQUE is exact
        written = {v for v in _written(stmt, column, multiparams, params) if v is not None}
        if written:
            _check_column(conn, column, live, written)


def _check_column(conn: Any, column: Any, live: Any, written: set[Any]) -> None:
    ctype, table = column.type, column.table
    sealed = {ctype.encrypt(Sealed(v, k)): v for v in written for k in live}
    if conn.dialect.name != "sqlite":
        keys = ctype.keys.table
        lock = min(k.key_id for k in live)
        conn.execute(select(keys.c.id).where(keys.c.id == lock).with_for_update()).all()
    raw = type_coerce(column, LargeBinary)
    stmt = select(raw).where(raw.in_(list(sealed)))
    if conn.dialect.name != "sqlite":
        stmt = stmt.with_for_update(read=True)
    seen: dict[Any, int] = {}
    for (found,) in conn.execute(stmt):
        value = sealed.get(bytes(found))
        seen[value] = seen.get(value, 0) + 1
        if seen[value] > 1:
            raise DuplicateValueError(
                f"{table.name}.{column.name} is unique: the value written is already stored under "
                "another live key of the column (a rotation is in progress)",
                table=table.name,
                column=column.name,
            )


def install(listeners: Listeners) -> None:
    """Check unique deterministic columns after each write on the engine of
    ``listeners`` (once per engine, however many managers are bound to it)."""
    listeners.share("after_execute", _check)
