"""Tokens kept in step with their rows, on every write path, in its transaction.

Every write reaches the database as a Core statement, whether it comes from
``conn.execute(insert(t), rows)``, an ORM flush, an ORM bulk statement or an
upsert. Two listeners on every Engine (``before_execute``, ``after_execute``)
see each one. Indexes in array storage (PostgreSQL) get their tokens added
to the statement's own parameters before it runs (:func:`.arrays.rewrite`):
nothing to do afterwards, and a DELETE needs nothing. For indexes in the
token table:

* **INSERT** (one row, many rows, ORM flush, ORM bulk): the primary keys are
  asked back (``return_defaults()``) when not given; afterwards the tokens
  of each row's values are inserted on the same connection.
* **UPDATE** of an indexed column: only by primary key (``WHERE pk = :value``
  for every key column,
  as the ORM flush and ORM bulk updates do, optionally ``AND`` more criteria
  for one row at a time); afterwards the row's tokens are replaced.
* **DELETE** (any criteria): the rows' keys are selected first; afterwards
  their tokens are deleted. A row inserted by another transaction between
  the two keeps its tokens: a stale token only adds a candidate that the
  re-check discards, never a wrong row.
* **Upsert** (``on_conflict_do_update`` on the primary key,
  ``on_duplicate_key_update`` on a table with no other unique key), setting
  each indexed column from the inserted values: the row's tokens are replaced.

Anything else that would change an indexed value (an UPDATE by other
criteria, a primary-key change, multi-row ``values([...])``, INSERT FROM
SELECT, ``on_conflict_do_nothing``) raises :class:`UnsupportedQueryError`
*before* it runs, so nothing is written with its tokens out of step.
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import Connection, Engine, UniqueConstraint, delete, event, select
from sqlalchemy.sql import operators as ops
from sqlalchemy.sql.elements import BindParameter, BinaryExpression, BooleanClauseList

from ..columns.rowvalue import RowValue
from ..columns.searchable import indexes_of
from ..errors import UnsupportedQueryError
from . import arrays, keyring, rowkeys
from . import tokens as tk

__all__ = ["install", "row_key_of", "token_entries"]

_PENDING = "sa_envelope_search_pending"
_installed = False


def install() -> None:
    """Listen on every Engine (idempotent; a statement on a table without
    search indexes costs two attribute reads)."""
    global _installed
    if not _installed:
        event.listen(Engine, "before_execute", _before, retval=True)
        event.listen(Engine, "after_execute", _after)
        _installed = True


def row_key_of(value: Any) -> str:
    """A primary-key value (or a tuple of them) as the token table stores it."""
    return rowkeys.encode(value if isinstance(value, tuple) else (value,))


def token_entries(index: Any, row_key: str, value: Any) -> list[tk.Entry]:
    """The token entries ``(name, row_key, token)`` of one row's value (none
    for NULL), for :func:`.tokens.insert_tokens`: each distinct token once."""
    if isinstance(value, RowValue):
        value = value.value
    if value is None:
        return []
    name = index.name
    return [(name, row_key, t) for t in index.tokens(value)]


def _refuse(indexes: Sequence[Any], why: str) -> UnsupportedQueryError:
    return arrays.refuse_write(indexes[0], why)


_key = arrays.key_name


def _written(stmt: Any, paramsets: Sequence[Any]) -> set[str]:
    keys = {_key(k) for k in (stmt._values or ())}
    for first in paramsets[:1]:
        if isinstance(first, dict):
            keys.update(first)
    return keys


def _pk_binds(where: Any, pks: list[Any]) -> tuple[list[BindParameter[Any]] | None, bool]:
    """(the binds of ``pk = :x`` for every key column in ``where``, in key
    order, or None; whether other criteria are ANDed)."""
    terms = list(where.clauses) if isinstance(where, BooleanClauseList) and where.operator is ops.and_ else [where]
    found: dict[str, BindParameter[Any]] = {}
    for term in terms:
        if isinstance(term, BinaryExpression) and term.operator is ops.eq:
            left, right = term.left, term.right
            for pk in pks:
                if isinstance(right, BindParameter) and getattr(left, "key", None) == pk.key and left.table is pk.table:
                    found.setdefault(pk.key, right)
    if len(found) != len(pks):
        return None, False
    return [found[pk.key] for pk in pks], len(terms) > len(pks)


def _keys_of(binds: list[BindParameter[Any]], paramsets: Sequence[Any]) -> list[str]:
    """The row keys the binds name, per parameter set."""
    return [
        rowkeys.encode([p.get(b.key, b.effective_value) if isinstance(p, dict) else b.effective_value for b in binds])
        for p in paramsets
    ]


# -- before: refuse, or plan --------------------------------------------------------------


def _before(conn: Connection, stmt: Any, multiparams: Any, params: Any, execution_options: Any) -> Any:
    if not getattr(stmt, "is_dml", False):
        return stmt, multiparams, params
    indexes = indexes_of(getattr(stmt, "table", None))
    if not indexes:
        return stmt, multiparams, params
    # before the binding's own before_execute: keys made for tokens go in conn's transaction
    with indexes[0].manager().use_connection(conn), keyring.using(conn):
        return _rewrite_or_plan(conn, stmt, multiparams, params, indexes)


def _rewrite_or_plan(conn: Connection, stmt: Any, multiparams: Any, params: Any, indexes: list[Any]) -> Any:
    paramsets = list(multiparams) if multiparams else [params or {}]
    in_arrays = [i for i in indexes if i.storage == "array"]
    if in_arrays and not stmt.is_delete:  # the tokens travel in the statement itself
        stmt, paramsets = arrays.rewrite(conn, stmt, paramsets, in_arrays)
        multiparams, params = (paramsets, {}) if len(paramsets) > 1 else ([], paramsets[0])
    indexes = [i for i in indexes if i.storage != "array"]
    if not indexes:
        return stmt, multiparams, params
    pk = rowkeys.columns_of(indexes[0])
    plan: tuple[Any, ...]
    if stmt.is_insert:
        stmt, plan = _plan_insert(stmt, indexes, pk, paramsets)
    elif stmt.is_update:
        plan = _plan_update(stmt, indexes, pk, paramsets)
    else:
        plan = ("delete", indexes, _rows_to_delete(conn, stmt, pk, paramsets))
    pending = conn.info.setdefault(_PENDING, [])
    del pending[:-8]  # plans of statements that failed (no after_execute) go
    pending.append((stmt, plan))
    return stmt, multiparams, params


def _plan_insert(stmt: Any, indexes: list[Any], pk: Any, paramsets: Sequence[Any]) -> tuple[Any, tuple[Any, ...]]:
    if stmt._multi_values:
        raise _refuse(indexes, "a multi-row values([...]) INSERT; pass the rows as a list of parameters instead")
    if getattr(stmt, "select", None) is not None:
        raise _refuse(indexes, "INSERT ... FROM SELECT")
    upsert = stmt._post_values_clause is not None
    if upsert:
        _check_upsert(stmt, indexes, pk, paramsets)
    if stmt._returning and not stmt._return_defaults:
        # SQLAlchemy compiles no returning() with return_defaults(): the keys come from the parameters
        if not _pks_given(stmt, pk, paramsets):
            raise _refuse(indexes, "an INSERT ... RETURNING whose primary keys the database makes; give them")
    elif not stmt._return_defaults:
        stmt = stmt.return_defaults()  # the new rows' keys, also from executemany
    return stmt, ("insert", indexes, upsert)


def _pks_given(stmt: Any, pk: Any, paramsets: Sequence[Any]) -> bool:
    given = {_key(k) for k in (stmt._values or ())}
    return all(c.key in given or (isinstance(p, dict) and p.get(c.key) is not None) for p in paramsets for c in pk)


def _inserted_keys(stmt: Any, pk: Any, result: Any) -> list[tuple[Any, ...]]:
    """The inserted rows' primary keys: from RETURNING / return_defaults, or
    (a caller's own returning()) from the statement's parameters."""
    if stmt._returning and not stmt._return_defaults:
        return [tuple(compiled[c.key] for c in pk) for compiled in result.context.compiled_parameters]
    return [tuple(row) for row in result.inserted_primary_key_rows]


def _check_upsert(stmt: Any, indexes: list[Any], pk: Any, paramsets: Sequence[Any]) -> None:
    clause = stmt._post_values_clause
    if not _pks_given(stmt, pk, paramsets):
        raise _refuse(indexes, "an upsert that does not give the primary key")
    sets = getattr(clause, "update_values_to_set", None)
    if sets is None:
        sets = getattr(clause, "update", None)
    if sets is None:
        raise _refuse(indexes, f"{type(clause).__name__} (use an upsert that updates the row)")
    if getattr(clause, "update_whereclause", None) is not None:
        raise _refuse(indexes, "an upsert whose update has a WHERE")
    targets = getattr(clause, "inferred_target_elements", None)
    if targets is not None:
        if sorted(_key(t) for t in targets) != sorted(c.key for c in pk):
            raise _refuse(indexes, "an upsert whose conflict target is not the primary key")
    elif any(isinstance(c, UniqueConstraint) for c in stmt.table.constraints) or any(
        i.unique for i in stmt.table.indexes
    ):
        raise _refuse(indexes, "ON DUPLICATE KEY UPDATE on a table with a unique key besides the primary key")
    pairs = dict((_key(k), v) for k, v in (sets.items() if isinstance(sets, dict) else sets))
    for index in indexes:
        value = pairs.get(index.source_column().key)
        if value is None or getattr(value, "key", None) != index.source_column().key:
            raise _refuse(indexes, f"an upsert that does not set {index.column} from the inserted row")


def _plan_update(stmt: Any, indexes: list[Any], pk: Any, paramsets: Sequence[Any]) -> tuple[Any, ...]:
    written = _written(stmt, paramsets)
    touched = [i for i in indexes if i.source_column().key in written]
    if any(c.key in written for c in pk):
        raise _refuse(indexes, f"an UPDATE of the primary key {', '.join(c.name for c in pk)}")
    if not touched:
        return ("none",)
    where = stmt.whereclause
    binds, more = _pk_binds(where, pk) if where is not None else (None, False)
    if binds is None:
        by = " AND ".join(f"{c.name} = :value" for c in pk)
        raise _refuse(
            indexes,
            f"an UPDATE of an indexed column by other criteria than the primary key "
            f"(WHERE {by}); update the rows by key, or through the ORM",
        )
    if more and len(paramsets) > 1:
        raise _refuse(indexes, "a many-row UPDATE by key with further criteria")
    return ("update", touched, _keys_of(binds, paramsets), more)


def _rows_to_delete(conn: Connection, stmt: Any, pk: Any, paramsets: Sequence[Any]) -> list[str] | None:
    """The keys of the rows a DELETE will remove (``None``: every row)."""
    where = stmt.whereclause
    if where is None:
        return None
    binds, more = _pk_binds(where, pk)
    if binds is not None and not more:
        return _keys_of(binds, paramsets)
    found: list[str] = []
    query = select(rowkeys.sql(pk)).where(where)
    for p in paramsets:
        found.extend(str(k) for k in conn.execute(query, p if isinstance(p, dict) else {}).scalars())
    return found


# -- after: write the tokens --------------------------------------------------------------


def _after(conn: Connection, stmt: Any, multiparams: Any, params: Any, execution_options: Any, result: Any) -> None:
    pending = conn.info.get(_PENDING)
    if not pending:
        return
    for i in range(len(pending) - 1, -1, -1):
        if pending[i][0] is stmt:
            plan = pending.pop(i)[1]
            break
    else:
        return
    if plan[0] == "insert":
        _after_insert(conn, stmt, plan[1], plan[2], result)
    elif plan[0] == "update":
        _after_update(conn, stmt, plan[1], plan[2], plan[3], result)
    elif plan[0] == "delete":
        _after_delete(conn, plan[1], plan[2])


def _value(compiled: dict[str, Any], column: Any, stmt: Any) -> Any:
    if column.key in compiled:
        return compiled[column.key]
    for k, v in (stmt._values or {}).items():
        if _key(k) == column.key and isinstance(v, BindParameter):
            return compiled.get(v.key, v.value)
    return None


def _after_insert(conn: Connection, stmt: Any, indexes: list[Any], upsert: bool, result: Any) -> None:
    found = _inserted_keys(stmt, rowkeys.columns_of(indexes[0]), result)
    if any(None in row for row in found):  # e.g. SQLite older than 3.35: no RETURNING for many rows
        raise _refuse(indexes, "an INSERT whose new primary keys the driver does not return; give them")
    keys = [rowkeys.encode(row) for row in found]
    tokens = indexes[0].tokens_table
    if upsert:
        tk.delete_row_tokens(conn, tokens, indexes[0].owner, [i.name for i in indexes], keys)
    rows: list[tk.Entry] = []
    sources = [(index, index.source_column()) for index in indexes]
    with indexes[0].keys.use_connection(conn):
        for row_key, compiled in zip(keys, result.context.compiled_parameters):
            for index, source in sources:
                rows.extend(token_entries(index, row_key, _value(compiled, source, stmt)))
        tk.insert_tokens(conn, tokens, indexes[0].owner, rows)


def _after_update(conn: Connection, stmt: Any, indexes: list[Any], keys: list[str], more: bool, result: Any) -> None:
    if more and result.rowcount == 0:
        return  # the further criteria matched nothing: the row is unchanged
    compiled_sets = result.context.compiled_parameters
    tokens = indexes[0].tokens_table
    tk.delete_row_tokens(conn, tokens, indexes[0].owner, [i.name for i in indexes], keys)
    rows: list[tk.Entry] = []
    with indexes[0].keys.use_connection(conn):
        for row_key, compiled in zip(keys, compiled_sets):
            for index in indexes:
                rows.extend(token_entries(index, row_key, _value(compiled, index.source_column(), stmt)))
        tk.insert_tokens(conn, tokens, indexes[0].owner, rows)


def _after_delete(conn: Connection, indexes: list[Any], keys: list[str] | None) -> None:
    tokens = indexes[0].tokens_table
    owner = indexes[0].owner
    if keys is None:
        conn.execute(delete(tokens).where(tokens.c.owner == owner, tokens.c.name.in_([i.name for i in indexes])))
    else:
        tk.delete_row_tokens(conn, tokens, owner, [i.name for i in indexes], keys)
