"""``insert(t).values([{...}, {...}])`` of row-scoped columns: one key per row.

With every row's primary key in the VALUES list, :mod:`.core` pairs each
row's values with a key bound to that row right in the list. Two shapes
cannot stay one multi-row statement:

* the database makes the primary keys (autoincrement): the keys can only be
  bound once it has made them, and a multi-row VALUES tells them to nobody
  (no ``inserted_primary_key_rows``, RETURNING rows in no promised order);
* an upsert whose SET writes a row-scoped value of its own: one SET clause
  for rows with different keys.

:func:`as_executemany` turns such a statement into the same INSERT run with
one parameter set per row, which :mod:`.core` treats as any executemany: one
statement with RETURNING of the primary keys sorted by parameter order (one
batch, so it stays all-or-nothing as the multi-row statement was), or one row
per statement in a savepoint (:mod:`.perrow`), in the caller's transaction.
That needs rows of plain values with the same columns; anything else is
refused with :class:`~sa_envelope.UnsupportedQueryError` before anything is
written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null

from .specs import TableSpec
from .writeplan import Plan, as_dict, bare, known, literal, refused

__all__ = ["as_executemany", "plan_of", "rows_of"]

_INSTEAD = "pass the rows as a list of parameter sets (conn.execute(insert(t), rows)) instead"


def rows_of(spec: TableSpec, stmt: Any) -> list[dict[str, Any]]:
    """The VALUES rows, keyed by column key."""
    return [as_dict(spec.table, row) for group in stmt._multi_values for row in group]


def plan_of(spec: TableSpec, rows: list[dict[str, Any]]) -> Plan:
    values = [{k: literal(r.get(k)) for k in spec.attrs if bare(literal(r.get(k)))} for r in rows]
    raw = [tuple(literal(r.get(c.key)) for c in spec.pk_cols) for r in rows]
    return Plan(spec, values, [known(pk) for pk in raw], raw_pks=raw)


def _plain(spec: TableSpec, key: str, value: Any) -> Any:
    """A row's value as a parameter: a Python value (a bound literal's value)."""
    if isinstance(value, Null):
        return None
    if isinstance(value, BindParameter) and (value.value is not None or value.callable):
        column = spec.table.c.get(key)
        if value.type._isnull or (column is not None and value.type is column.type):
            return value.effective_value
    if isinstance(value, ClauseElement):
        raise refused(spec, "a multi-row INSERT ... VALUES with SQL expressions in its rows", _INSTEAD)
    return value


def as_executemany(
    spec: TableSpec, stmt: Any, rows: list[dict[str, Any]], multiparams: Any, params: Any
) -> tuple[Any, list[dict[str, Any]]]:
    """The statement without its VALUES list, and the rows as parameter sets."""
    if multiparams or params:
        raise refused(spec, "a multi-row INSERT ... VALUES executed with parameters", _INSTEAD)
    if any(set(r) != set(rows[0]) for r in rows):
        raise refused(spec, "a multi-row INSERT ... VALUES whose rows set different columns", _INSTEAD)
    plist = [{k: _plain(spec, k, v) for k, v in r.items()} for r in rows]
    for column in spec.pk_cols:  # given as None in every row: the database makes it
        if all(p.get(column.key, 0) is None for p in plist):
            for p in plist:
                del p[column.key]
    new = stmt._generate()
    new._multi_values = ()
    return new, plist
