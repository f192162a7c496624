"""Which upserts of row-scoped columns can be given correct row keys, and their SET.

An upsert's row is either inserted or updated, and the statement is built
before anyone knows which. A row-scoped value must end up under the key
bound to the row it lands in (:mod:`.binding`). :mod:`.core` seals the
proposed row's values, and the values its SET writes, under the key already
bound to that primary key, or a new key bound to it, so the ciphertext is
right either way *if* the row the upsert updates is the row with the
proposed primary key. Hence, when the SET writes a row-scoped column, the
conflict target must be the primary key (``index_elements`` naming exactly
its columns, or the primary key constraint's name); MySQL and MariaDB's
``ON DUPLICATE KEY UPDATE`` fires on any unique key, so the table must have
no unique constraint or index but its primary key.

The SET may hold the proposed row's value of the same column
(``stmt.excluded.col``, ``stmt.inserted.col``: a copy of a ciphertext already
sealed under the row's key), NULL, or a Python value (or a ``bindparam()``
whose value is in the parameters). A Python value is one ciphertext per row:
:func:`with_set` turns the SET entry into a parameter that :mod:`.core` fills
for each parameter set, sealed under that row's key. An executemany whose SET
takes a parameter per row runs one row per statement (:mod:`.perrow`): the
drivers and SQLAlchemy's "insertmanyvalues" fold an executemany INSERT into
multi-row statements with one SET clause, which would give every row the
first row's value.

``on_conflict_do_nothing`` and a SET of other columns only need the key
choice, not the target. Everything else is refused with
:class:`~sa_envelope.UnsupportedQueryError` before anything is written.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sqlalchemy import Index, UniqueConstraint
from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null
from sqlalchemy.util import immutabledict

from ..columns.writeguard import is_proposed, upsert_assignments
from ..errors import UnsupportedQueryError
from .specs import TableSpec

__all__ = ["PARAM", "VALUE", "check_upsert", "is_upsert", "per_row_sets", "set_writes", "with_set"]

VALUE = "value"  # a Python value given in the SET
PARAM = "param"  # a bindparam() whose value is in each parameter set


def is_upsert(stmt: Any) -> bool:
    """An INSERT that may leave an existing row in place: an ``ON CONFLICT`` /
    ``ON DUPLICATE KEY`` clause, or ``INSERT IGNORE`` / ``INSERT OR IGNORE``
    (``prefix_with``). Its rows keep the keys bound to them: nothing is shredded."""
    if getattr(stmt, "_post_values_clause", None) is not None:
        return True
    return any("IGNORE" in str(prefix).upper() for prefix, _ in getattr(stmt, "_prefixes", ()))


def _name(key: Any) -> str | None:
    return key if isinstance(key, str) else getattr(key, "key", None)


def set_writes(spec: TableSpec, stmt: Any) -> dict[str, tuple[str, Any]]:
    """The row-scoped columns the SET writes with a value of its own:
    column key -> (:data:`VALUE`, the Python value) or (:data:`PARAM`, the
    parameter's name). NULL and the proposed row's value need nothing."""
    out: dict[str, tuple[str, Any]] = {}
    for key, value in upsert_assignments(stmt):
        name = _name(key)
        if name not in spec.attrs or value is None or isinstance(value, Null) or is_proposed(value, spec.table, name):
            continue
        if not isinstance(value, ClauseElement):  # SQLAlchemy 2.0 keeps the Python value as given
            out[name] = (VALUE, value)
        elif isinstance(value, BindParameter):  # writeguard refused every other expression
            if value.value is None and not value.callable:
                out[name] = (PARAM, value.key)
            elif value.effective_value is not None:
                out[name] = (VALUE, value.effective_value)
    return out


def per_row_sets(sets: dict[str, tuple[str, Any]], plist: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What the SET writes into each row (column key -> value), per parameter set."""
    if not sets:
        return []
    return [{k: (v if kind == VALUE else params.get(v)) for k, (kind, v) in sets.items()} for params in plist]


def with_set(stmt: Any, replacements: dict[str, Any]) -> Any:
    """``stmt`` with these SET entries (by column key) replaced: a copy of its
    ON CONFLICT / ON DUPLICATE KEY clause, the rest shared."""
    clause = stmt._post_values_clause._clone()
    attr = "update_values_to_set" if hasattr(clause, "update_values_to_set") else "update"
    sets = getattr(clause, attr)  # a dict in SQLAlchemy 2.1 (and MySQL's), pairs in 2.0
    pairs = [(k, replacements.get(_name(k) or "", v)) for k, v in (sets.items() if isinstance(sets, dict) else sets)]
    setattr(clause, attr, immutabledict(pairs) if isinstance(sets, immutabledict) else type(sets)(pairs))
    new = stmt._generate()
    new._post_values_clause = clause
    return new


def check_upsert(spec: TableSpec, stmt: Any) -> None:
    """Refuse an upsert whose SET could write a row-scoped value into a row
    other than the one with the proposed primary key."""
    written = [name for name in (_name(k) for k, _ in upsert_assignments(stmt)) if name in spec.attrs]
    if written and not _targets_primary_key(spec, stmt._post_values_clause):
        raise _refused(
            spec,
            written[0],
            "may update a row other than the one with the proposed primary key",
            "make the primary key the conflict target (index_elements=[...primary key columns]); "
            "on MySQL/MariaDB the table must have no other unique key",
        )


def _targets_primary_key(spec: TableSpec, clause: Any) -> bool:
    pk_names = {c.name for c in spec.pk_cols}
    if hasattr(clause, "inferred_target_elements"):  # PostgreSQL, SQLite
        elements = clause.inferred_target_elements
        if elements:
            return {e if isinstance(e, str) else getattr(e, "name", None) for e in elements} == pk_names
        target = clause.constraint_target
        return target is not None and target == spec.table.primary_key.name
    return not _other_unique_keys(spec)  # MySQL, MariaDB: any unique key fires


def _other_unique_keys(spec: TableSpec) -> bool:
    pk_names = {c.name for c in spec.pk_cols}
    table = spec.table
    keys: list[Any] = [c for c in table.constraints if isinstance(c, UniqueConstraint)]
    keys += [i for i in table.indexes if isinstance(i, Index) and i.unique]
    return any({c.name for c in item.columns} != pk_names for item in keys)


def _refused(spec: TableSpec, column: str, what: str, instead: str) -> UnsupportedQueryError:
    return UnsupportedQueryError(
        f"this upsert of the row-scoped column {spec.owner}.{column} {what}; {instead}", table=spec.owner, column=column
    )
