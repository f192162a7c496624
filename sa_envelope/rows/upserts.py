"""Which upserts of row-scoped columns can be given correct row keys.

An upsert's row is either inserted or updated, and the statement is built
before anyone knows which. A row-scoped value must end up under the key
bound to the row it lands in (:mod:`.binding`). :mod:`.core` seals the
proposed row's values under the key already bound to that primary key, or a
new key bound to it, so the ciphertext is right either way *if* the row the
upsert updates is the row with the proposed primary key. Hence, when the
SET writes a row-scoped column:

* the conflict target must be the primary key (``index_elements`` naming
  exactly its columns, or the primary key constraint's name); MySQL and
  MariaDB's ``ON DUPLICATE KEY UPDATE`` fires on any unique key, so the table
  must have no unique constraint or index but its primary key;
* the value set must be the proposed row's value of the same column
  (``stmt.excluded.col``, ``stmt.inserted.col``) or NULL: a Python value in
  the SET is one ciphertext for every row of the statement, under one key.

``on_conflict_do_nothing`` and a SET of other columns only need the first
rule's key choice, not the target. Everything else is refused with
:class:`~sa_envelope.UnsupportedQueryError` before anything is written.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Index, UniqueConstraint
from sqlalchemy.sql.elements import BindParameter, Null

from ..columns.writeguard import is_proposed, upsert_assignments
from ..errors import UnsupportedQueryError
from .specs import TableSpec

__all__ = ["check_upsert", "is_upsert"]


def is_upsert(stmt: Any) -> bool:
    """An INSERT that may leave an existing row in place: an ``ON CONFLICT`` /
    ``ON DUPLICATE KEY`` clause, or ``INSERT IGNORE`` / ``INSERT OR IGNORE``
    (``prefix_with``). Its rows keep the keys bound to them: nothing is shredded."""
    if getattr(stmt, "_post_values_clause", None) is not None:
        return True
    return any("IGNORE" in str(prefix).upper() for prefix, _ in getattr(stmt, "_prefixes", ()))


def check_upsert(spec: TableSpec, stmt: Any) -> None:
    """Refuse an upsert whose SET cannot keep row keys bound to their rows."""
    written = []
    for key, value in upsert_assignments(stmt):
        name = key if isinstance(key, str) else getattr(key, "key", None)
        if name not in spec.attrs:
            continue
        written.append(name)
        if isinstance(value, Null) or (isinstance(value, BindParameter) and value.value is None and not value.callable):
            continue  # NULL: no key needed
        if not is_proposed(value, spec.table, name):
            raise _refused(
                spec,
                name,
                "sets it to a value given in the SET, one ciphertext for rows with different keys",
                f"set it to the proposed row's value (stmt.excluded.{name} or stmt.inserted.{name})",
            )
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
