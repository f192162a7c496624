"""What a Core INSERT or UPDATE writes into row-scoped columns, per parameter set.

Read from the statement before it compiles (:mod:`.core` then makes the
keys and rewrites it): the values come from the parameters (by column key),
from ``values()`` (a Python value, or a named ``bindparam`` whose value is in
the parameters), from a multi-row ``values([...])``, or from a column's
Python-side default; the primary key from the same places (INSERT) or from
the WHERE clause's ``pk == value`` terms (UPDATE). SQL expressions are not
read: :mod:`sa_envelope.columns.writeguard` refused them already.

A Python value given in ``values()`` is one value for every parameter set,
but each row needs its own ciphertext, under its own key: the plan names a
parameter for it (:data:`FIXED`, filled per row by :mod:`.core`), and
:func:`replace_values` puts that parameter in the statement in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from sqlalchemy import Table
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList, ColumnElement
from sqlalchemy.util import immutabledict

from ..columns.rowvalue import RowValue
from ..errors import UnsupportedQueryError
from .specs import TableSpec

__all__ = [
    "FIXED",
    "PASS_PK",
    "Plan",
    "any_bare",
    "as_dict",
    "bare",
    "known",
    "literal",
    "plan_for",
    "python_defaults",
    "refused",
    "replace_values",
]

FIXED = "_sa_env_value_"  # + column key: the per-row parameter standing for a values() entry


@dataclass
class Plan:
    """The row-scoped values of one statement, per parameter set."""

    spec: TableSpec
    values: list[dict[str, Any]]  # per row: column key -> bare value
    pks: list[tuple[Any, ...] | None]
    fixed: dict[str, Any] = field(default_factory=dict)  # values() entries: column key -> BindParameter
    names: dict[str, str] = field(default_factory=dict)  # column key -> the parameter holding its value
    existing: list[Any] = field(default_factory=list)  # per row: the key a paired value already has (ORM)
    raw_pks: list[tuple[Any, ...]] = field(default_factory=list)  # INSERT: per row, None where the database makes it
    sets: dict[str, tuple[str, Any]] = field(default_factory=dict)  # upsert SET entries (:func:`.upserts.set_writes`)
    set_values: list[dict[str, Any]] = field(default_factory=list)  # per row: column key -> the value the SET writes


# -- reading a statement's row-scoped values -----------------------------------------------


def bare(value: Any) -> bool:
    return value is not None and type(value) is not RowValue


def any_bare(spec: TableSpec, plist: list[Mapping[str, Any]]) -> bool:
    attrs = spec.attrs
    return any(bare(params.get(k)) for params in plist for k in attrs)


def python_defaults(spec: TableSpec, is_update: bool = False) -> list[tuple[str, Any]]:
    """Row-scoped columns with a Python-side ``default`` (INSERT) or ``onupdate``
    (UPDATE), such as ``default=date.today``: SQLAlchemy computes it while
    executing, past the ORM's hooks, so the plan computes it first and pairs
    it with the row's key like any value."""
    found = [(c.key, c.onupdate if is_update else c.default) for c in spec.columns]
    return [(k, d) for k, d in found if d is not None and (d.is_scalar or d.is_callable)]


class _DefaultContext:
    """What a context-sensitive default function reads (``get_current_parameters``)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.current_parameters = dict(params)

    def get_current_parameters(self, isolate_multiinsert_groups: bool = True) -> dict[str, Any]:
        return self.current_parameters


def _default_value(default: Any, params: Mapping[str, Any]) -> Any:
    return default.arg if default.is_scalar else default.arg(_DefaultContext(params))


def literal(value: Any) -> Any:
    """The Python value of a ``values()`` entry (``None`` for an SQL expression:
    :mod:`sa_envelope.columns.writeguard` has refused those already)."""
    if isinstance(value, BindParameter):
        return value.effective_value if value.value is not None or value.callable else None
    return None if isinstance(value, ColumnElement) else value


def known(pk: Sequence[Any]) -> tuple[Any, ...] | None:
    """The primary key as a tuple, or ``None`` if any of its values is unknown
    (runs once per row of an executemany: no generator, and a tuple given is
    returned as it is, not copied: one object fewer per row)."""
    for v in pk:
        if v is None:
            return None
    return pk if type(pk) is tuple else tuple(pk)


def _key_of(table: Table, key: Any) -> str | None:
    if isinstance(key, str):
        return key
    column = getattr(key, "key", None)
    return column if isinstance(column, str) and column in table.c else None


def as_dict(table: Table, row: Any) -> dict[str, Any]:
    """A multi-values row (dict, or tuple in column order) keyed by column key."""
    if isinstance(row, dict):
        return {_key_of(table, k) or k: v for k, v in row.items()}
    return {c.key: v for c, v in zip(table.columns, row)}


def _values_clause(stmt: Any, table: Table) -> dict[str, Any]:
    ordered = getattr(stmt, "_ordered_values", None) or ()
    out: dict[str, Any] = {}
    for key, value in (*ordered, *(stmt._values or {}).items()):
        name = _key_of(table, key)
        if name is not None:
            out[name] = value
    return out


def plan_for(spec: TableSpec, stmt: Any, plist: list[Mapping[str, Any]]) -> Plan:
    """Who writes what: parameters (``col.key``), or ``values()`` entries, a
    Python value or a named ``bindparam`` whose value is in the parameters."""
    clause = _values_clause(stmt, spec.table)
    plan = Plan(spec, [], [])
    for key in spec.attrs:
        entry = clause.get(key)
        if isinstance(entry, BindParameter) and entry.value is None and not entry.callable:
            plan.names[key] = entry.key
        elif entry is not None and bare(literal(entry)):
            plan.fixed[key] = literal(entry)
            plan.names[key] = FIXED + key
    where = _where_pk(spec, stmt) if stmt.is_update else None
    defaults = python_defaults(spec, stmt.is_update)
    names = [(k, plan.names.get(k, k)) for k in spec.attrs]
    fixed, is_update, pk_cols = plan.fixed, stmt.is_update, spec.pk_cols
    add_values, add_existing, add_pk, add_raw = (
        plan.values.append,
        plan.existing.append,
        plan.pks.append,
        plan.raw_pks.append,
    )
    single = pk_cols[0] if len(pk_cols) == 1 else None
    for params in plist:  # once per row of an executemany: plain loops, no generators, no lookups
        get = params.get
        if fixed or defaults:
            row = {k: get(n) for k, n in names}
            row.update(fixed)
            for key, default in defaults:
                if plan.names.get(key, key) not in params and key not in clause:
                    row[key] = _default_value(default, params)
            values = {k: v for k, v in row.items() if v is not None}
        else:  # the usual executemany: one dict per row, straight from the parameters
            values = {k: v for k, n in names if (v := get(n)) is not None}
        existing = None
        for v in values.values():
            if type(v) is RowValue:  # paired already (the ORM's): its key is the row's
                existing = v.key
                break
        if existing is not None:
            values = {k: v for k, v in values.items() if type(v) is not RowValue}
        add_values(values)
        add_existing(existing)
        if is_update:
            add_pk(None if where is None else known([_pk_value(w, params) for w in where]))
        else:
            raw = (_insert_pk(single, clause, params),) if single is not None else _raw_pk(pk_cols, clause, params)
            add_raw(raw)
            add_pk(known(raw))
    return plan


def _raw_pk(pk_cols: Sequence[Any], clause: dict[str, Any], params: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple([_insert_pk(c, clause, params) for c in pk_cols])


def replace_values(stmt: Any, replacements: Mapping[str, Any]) -> Any:
    """``stmt`` with these ``values()`` entries (by column key) replaced, each
    under the key the caller gave it (a column or its name)."""
    new = stmt._generate()
    table = stmt.table
    if new._values:
        new._values = immutabledict({k: replacements.get(_key_of(table, k) or "", v) for k, v in new._values.items()})
    ordered = getattr(new, "_ordered_values", None)  # SQLAlchemy 2.0's ordered_values()
    if ordered:
        new._ordered_values = [(k, replacements.get(_key_of(table, k) or "", v)) for k, v in ordered]
    return new


def _insert_pk(column: Any, clause: dict[str, Any], params: Mapping[str, Any]) -> Any:
    if column.key in params:
        return params[column.key]
    if column.key in clause:
        return literal(clause[column.key])
    default = column.default
    return default.arg if default is not None and default.is_scalar else None


def _where_pk(spec: TableSpec, stmt: Any) -> list[Any] | None:
    """The WHERE clause's ``pk == value`` terms, in primary-key order, or ``None``."""
    terms: list[Any] = []
    for criterion in stmt._where_criteria:
        if isinstance(criterion, BooleanClauseList) and criterion.operator is operators.and_:
            terms.extend(criterion.clauses)
        else:
            terms.append(criterion)
    found: dict[str, Any] = {}
    for term in terms:
        if not isinstance(term, BinaryExpression) or term.operator is not operators.eq:
            continue
        for col, other in ((term.left, term.right), (term.right, term.left)):
            key = getattr(col, "key", None)
            if key in spec.pk_attrs and isinstance(other, BindParameter):
                if getattr(col, "_deannotate", None) and col._deannotate() is spec.table.c[key]:
                    found[key] = other
    if len(found) != len(spec.pk_attrs):
        return None
    return [found[k] for k in spec.pk_attrs]


def _pk_value(bind: BindParameter[Any], params: Mapping[str, Any]) -> Any:
    if bind.value is None and not bind.callable:
        return params.get(bind.key)
    return bind.effective_value


PASS_PK = "pass the primary key values in the statement's parameters, or insert through the ORM"


def refused(spec: TableSpec, what: str, instead: str) -> UnsupportedQueryError:
    return UnsupportedQueryError(
        f"{what} cannot give the row-scoped columns of {spec.owner} keys bound to their rows; {instead}",
        table=spec.owner,
    )
