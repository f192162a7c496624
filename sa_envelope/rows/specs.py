"""Which columns of a mapped (or Core) table are row-scoped, and how to find
the keys their stored values name. Shared by the flush hooks (:mod:`.orm`)
and the shredding (:mod:`.shred`)."""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import Column, Connection, LargeBinary, Table, select, tuple_, type_coerce
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.state import InstanceState

from ..columns.encrypted import EncryptedType
from ..envelope import format as fmt
from ..keys import table as kt
from .keyrows import IN_CHUNK

__all__ = ["TableSpec", "core_spec", "pk_of", "row_key_ids", "specs"]


@dataclass(frozen=True, eq=False)
class TableSpec:
    """The row-scoped columns of one mapped table that one KeyManager serves."""

    manager: Any
    table: Table
    owner: str
    attrs: tuple[str, ...]
    columns: tuple[Column[Any], ...]
    pk_attrs: tuple[str, ...]
    pk_cols: tuple[Column[Any], ...]
    pk_index: tuple[int, ...]  # positions of pk_cols in the instance's identity


_SPECS: weakref.WeakKeyDictionary[Mapper[Any], tuple[TableSpec, ...]] = weakref.WeakKeyDictionary()


def specs(mapper: Mapper[Any]) -> tuple[TableSpec, ...]:
    """Row-scoped columns of ``mapper``, grouped by table and manager (cached)."""
    found = _SPECS.get(mapper)
    if found is None:
        found = _SPECS[mapper] = _build_specs(mapper)
    return found


def _build_specs(mapper: Mapper[Any]) -> tuple[TableSpec, ...]:
    groups: dict[tuple[int, Table], list[tuple[str, Column[Any]]]] = defaultdict(list)
    for prop in mapper.column_attrs:
        col = prop.columns[0]
        t = col.type
        if isinstance(t, EncryptedType) and t.scope == kt.SCOPE_ROW and t.keys is not None:
            if isinstance(col, Column) and isinstance(col.table, Table):
                groups[(id(t.keys), col.table)].append((prop.key, col))
    out = []
    for (_, table), items in groups.items():
        first: EncryptedType = items[0][1].type  # type: ignore[assignment]
        pk_cols = tuple(table.primary_key.columns)
        pk_props = [mapper.get_property_by_column(c) for c in pk_cols]
        identity = [mapper.get_property_by_column(c) for c in mapper.primary_key]
        out.append(
            TableSpec(
                manager=first.keys,
                table=table,
                owner=first._table or table.name,
                attrs=tuple(a for a, _ in items),
                columns=tuple(c for _, c in items),
                pk_attrs=tuple(p.key for p in pk_props),
                pk_cols=pk_cols,
                pk_index=tuple(identity.index(p) for p in pk_props),
            )
        )
    return tuple(out)


def core_spec(manager: Any, table: Table) -> TableSpec | None:
    """The spec of a Core table's row-scoped columns of ``manager``, if any."""
    columns = [
        c
        for c in table.columns
        if isinstance(c.type, EncryptedType) and c.type.scope == kt.SCOPE_ROW and c.type.keys is manager
    ]
    if not columns:
        return None
    pk_cols = tuple(table.primary_key.columns)
    owner = columns[0].type._table or table.name  # type: ignore[attr-defined]
    return TableSpec(
        manager,
        table,
        owner,
        tuple(c.key for c in columns),
        tuple(columns),
        tuple(c.key for c in pk_cols),
        pk_cols,
        tuple(range(len(pk_cols))),
    )


def pk_of(state: InstanceState[Any], spec: TableSpec) -> tuple[Any, ...]:
    """The row's primary key from the identity (attributes may be expired)."""
    if state.key is None:
        return tuple(state.dict.get(a) for a in spec.pk_attrs)
    ident = state.key[1]
    return tuple(ident[j] for j in spec.pk_index)


def row_key_ids(conn: Connection, spec: TableSpec, pks: Sequence[tuple[Any, ...]]) -> dict[tuple[Any, ...], list[int]]:
    """Key ids named by the stored row-scoped values of each row, in column order."""
    raw = [type_coerce(c, LargeBinary()).label(f"_sa_env_v{i}") for i, c in enumerate(spec.columns)]
    npk = len(spec.pk_cols)
    found: dict[tuple[Any, ...], list[int]] = {}
    for start in range(0, len(pks), IN_CHUNK):
        chunk = list(pks[start : start + IN_CHUNK])
        if npk == 1:
            where = spec.pk_cols[0].in_([p[0] for p in chunk])
        else:
            where = tuple_(*spec.pk_cols).in_(chunk)
        stmt = select(*spec.pk_cols, *raw).where(where)
        for row in spec.manager.rows_for(conn).query(lambda: conn.execute(stmt).all(), spec.owner):
            ids = [fmt.key_id_of(bytes(v)) for v in row[npk:] if v]
            found[tuple(row[:npk])] = list(dict.fromkeys(ids))
    return found
