"""ORM hooks that give every row its row key, in the row's own transaction.

The bind processor of a row-scoped column sees one value, never its row, so
the row's key has to travel with the value. These hooks do that:

* ``before_flush``: for every new instance with a non-NULL row-scoped value,
  a fresh row key; for every changed row-scoped attribute of a persistent
  instance, the key its row already has (read, batched, from the headers of
  the stored values; a row without one gets a fresh key). New keys are made
  in bulk (``RowKeys.create``: one executemany per table) on the session's
  connection, so they commit or roll back with the rows. Then each value
  about to be written is replaced in the instance's ``__dict__`` by a
  :class:`RowValue` (value + key), which the ORM copies into the INSERT or
  UPDATE parameters; ``after_flush`` (or ``after_soft_rollback`` when the
  flush fails) puts the plain values back. ``add``, ``add_all``, ``merge``
  and attribute updates all end up here.
* ``do_orm_execute``: ORM bulk ``session.execute(insert(Model), [dicts])``
  and bulk UPDATE by primary key (``session.execute(update(Model), [dicts])``)
  get the same treatment on their parameter dicts.

Anything else that writes a bare value into a row-scoped column (Core
``insert()``, an ORM ``update().values(...)`` with a WHERE clause, the legacy
``bulk_insert_mappings``) reaches the bind processor without a key and raises
:class:`~sa_envelope.RowKeyRequiredError` before anything is written. Core
users pass ``KeyManager.new_row_key(conn, table).value(v)`` instead.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import Column, Connection, LargeBinary, Table, event, select, tuple_, type_coerce
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.state import InstanceState

from ..columns.encrypted import EncryptedType
from ..columns.rowvalue import RowValue
from ..envelope import format as fmt
from ..errors import EnvelopeError, KeyNotFoundError
from ..keys import table as kt
from ..keys.cache import CachedKey
from .keys import IN_CHUNK

__all__ = ["TableSpec", "install_orm_hooks", "row_key_ids", "shred_instance", "specs"]

_RESTORE = "sa_envelope_row_restore"
_installed = False


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
        out.append(TableSpec(
            manager=first.keys, table=table, owner=first._table or table.name,
            attrs=tuple(a for a, _ in items), columns=tuple(c for _, c in items),
            pk_attrs=tuple(p.key for p in pk_props), pk_cols=pk_cols,
            pk_index=tuple(identity.index(p) for p in pk_props),
        ))
    return tuple(out)


def install_orm_hooks() -> None:
    """Listen on every Session (idempotent; the hooks do nothing for models
    without row-scoped columns)."""
    global _installed
    if _installed:
        return
    event.listen(Session, "before_flush", _before_flush)
    event.listen(Session, "after_flush", _restore)
    event.listen(Session, "after_soft_rollback", _restore)
    event.listen(Session, "do_orm_execute", _do_orm_execute)
    _installed = True


# -- reading the keys rows already have --------------------------------------------


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
        for row in spec.manager.rows.query(lambda: conn.execute(stmt).all(), spec.owner):
            ids = [fmt.key_id_of(bytes(v)) for v in row[npk:] if v]
            found[tuple(row[:npk])] = list(dict.fromkeys(ids))
    return found


def existing_keys(conn: Connection, spec: TableSpec, pks: Sequence[tuple[Any, ...]]) -> list[CachedKey | None]:
    """The live row key of each row, or ``None`` where it has none (no value
    stored yet, or its key was shredded). A key missing from the key table
    raises :class:`KeyNotFoundError`: a row never silently changes keys."""
    rows = spec.manager.rows
    ids_by_pk = row_key_ids(conn, spec, pks)
    all_ids = {k for ids in ids_by_pk.values() for k in ids}
    rows.load(conn, rows.missing(all_ids), table=spec.owner, column=None)
    _check_present(conn, spec, rows.missing(all_ids))
    out: list[CachedKey | None] = []
    for pk in pks:
        live = None
        for key_id in ids_by_pk.get(tuple(pk), ()):
            entry = rows.cache.get(key_id)
            if entry is not None and entry.cipher is not None:
                live = entry
                break
        out.append(live)
    return out


def _check_present(conn: Connection, spec: TableSpec, ids: set[int]) -> None:
    """Ids that are not row keys must at least exist (as table keys)."""
    if not ids:
        return
    present = {r.id for r in kt.get_records(conn, spec.manager.table, ids)}
    for key_id in sorted(ids - present):
        raise KeyNotFoundError(table=spec.owner, key_id=fmt.format_key_id(key_id))


def _keys_for(conn: Connection, spec: TableSpec, pks: list[tuple[Any, ...]] | None, count: int) -> list[CachedKey]:
    """Existing keys where rows have them (``pks`` given: updates), new ones for the rest."""
    keys: list[CachedKey | None] = existing_keys(conn, spec, pks) if pks is not None else [None] * count
    gaps = [i for i, k in enumerate(keys) if k is None]
    for i, key in zip(gaps, spec.manager.rows.create(conn, spec.owner, len(gaps))):
        keys[i] = key
    return keys  # type: ignore[return-value]


# -- flush ---------------------------------------------------------------------------


def _pk_of(state: InstanceState[Any], spec: TableSpec) -> tuple[Any, ...]:
    """The row's primary key from the identity (attributes may be expired)."""
    if state.key is None:
        return tuple(state.dict.get(a) for a in spec.pk_attrs)
    ident = state.key[1]
    return tuple(ident[j] for j in spec.pk_index)


def _changed(state: InstanceState[Any], spec: TableSpec) -> list[str]:
    """Row-scoped attributes of a persistent instance whose new value is stored."""
    out = []
    for attr in spec.attrs:
        if attr not in state.committed_state or state.dict.get(attr) is None:
            continue
        old = state.committed_state[attr]
        if old is NO_VALUE or not state.manager[attr].impl.is_equal(state.dict[attr], old):
            out.append(attr)
    return out


def _before_flush(session: Session, flush_context: UOWTransaction, instances: Any) -> None:
    inserts: dict[TableSpec, list[tuple[InstanceState[Any], list[str]]]] = defaultdict(list)
    updates: dict[TableSpec, list[tuple[InstanceState[Any], list[str]]]] = defaultdict(list)
    for obj in session.new:
        state = orm_attributes.instance_state(obj)
        for spec in specs(state.mapper):
            attrs = [a for a in spec.attrs if state.dict.get(a) is not None]
            if attrs:
                inserts[spec].append((state, attrs))
    for obj in session.dirty:
        state = orm_attributes.instance_state(obj)
        for spec in specs(state.mapper):
            attrs = _changed(state, spec)
            if attrs:
                updates[spec].append((state, attrs))
    for plan, is_update in ((inserts, False), (updates, True)):
        for spec, items in plan.items():
            conn = session.connection(bind_arguments={"mapper": items[0][0].mapper})
            pks = [_pk_of(s, spec) for s, _ in items] if is_update else None
            restore = session.info.setdefault(_RESTORE, [])
            for (state, attrs), key in zip(items, _keys_for(conn, spec, pks, len(items))):
                _wrap(restore, state, attrs, key)


def _wrap(restore: list[Any], state: InstanceState[Any], attrs: Iterable[str], key: CachedKey) -> None:
    """Pair each value with its row key for the coming INSERT/UPDATE only."""
    dict_ = state.dict
    for attr in attrs:
        original = dict_[attr]
        dict_[attr] = RowValue(original, key)
        restore.append((dict_, attr, original))


def _restore(session: Session, *args: Any) -> None:
    """Put the plain values back once the flush ran (or failed)."""
    for dict_, attr, original in session.info.pop(_RESTORE, ()):
        if type(dict_.get(attr)) is RowValue:
            dict_[attr] = original


# -- ORM bulk statements -----------------------------------------------------------------


def _do_orm_execute(orm_state: ORMExecuteState) -> Any:
    if not (orm_state.is_insert or (orm_state.is_update and orm_state.is_executemany)):
        return None
    mapper = orm_state.bind_mapper
    params = orm_state.parameters
    if mapper is None or not params:
        return None
    table_specs = specs(mapper)
    if not table_specs:
        return None
    plist: list[dict[str, Any]] = list(params) if isinstance(params, list) else [dict(params)]  # type: ignore[arg-type]
    extra: list[dict[str, Any]] = [{} for _ in plist]
    conn = orm_state.session.connection(bind_arguments={"mapper": mapper})
    for spec in table_specs:
        need = [(i, [a for a in spec.attrs if p.get(a) is not None]) for i, p in enumerate(plist)]
        need = [(i, attrs) for i, attrs in need if attrs]
        if not need:
            continue
        pks = [_bulk_pk(plist[i], spec) for i, _ in need] if orm_state.is_update else None
        for (i, attrs), key in zip(need, _keys_for(conn, spec, pks, len(need))):
            for attr in attrs:
                extra[i][attr] = RowValue(plist[i][attr], key)
    if not any(extra):
        return None
    return orm_state.invoke_statement(params=extra if isinstance(params, list) else extra[0])


def _bulk_pk(params: dict[str, Any], spec: TableSpec) -> tuple[Any, ...]:
    try:
        return tuple(params[a] for a in spec.pk_attrs)
    except KeyError:
        raise EnvelopeError(
            f"bulk UPDATE of row-scoped columns of {spec.owner} needs the primary key in every row",
            table=spec.owner,
        ) from None


# -- shredding an instance ------------------------------------------------------------------


def shred_instance(manager: Any, instance: Any) -> list[int]:
    """Shred the row key(s) of ``instance``'s row in its session's transaction."""
    state = orm_attributes.instance_state(instance)
    session = state.session
    if session is None:
        raise EnvelopeError("shred() needs an instance attached to a Session (or use shred_key)")
    if state.key is None or state.modified:
        session.flush()
    shredded: list[int] = []
    conn = session.connection(bind_arguments={"mapper": state.mapper})
    for spec in specs(state.mapper):
        if spec.manager is not manager:
            continue
        pk = _pk_of(state, spec)
        for key_id in row_key_ids(conn, spec, [pk]).get(pk, ()):
            manager.rows.shred_key(conn, key_id, owner=spec.owner)
            shredded.append(key_id)
        session.expire(instance, list(spec.attrs))  # drop the plaintext held in memory
    return shredded
