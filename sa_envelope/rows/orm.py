"""ORM hooks that give every row its row key, in the row's own transaction.

The bind processor of a row-scoped column sees one value, never its row, so
the row's key has to travel with the value. These hooks do that:

* ``before_flush``: for every new instance with a non-NULL row-scoped value,
  a fresh row key bound to the row (:mod:`.binding`; live keys still bound
  to an earlier row with that primary key are shredded: :func:`.shred.retire`);
  for every changed row-scoped attribute of a persistent instance, the key
  bound to its row (found, batched, by the rows' digests, never by what a
  stored value names; a row without one gets a fresh key); for every deleted
  instance, its keys shredded (:func:`.shred.shred_deleted`). New keys are made
  in bulk (``RowKeys.create``: one executemany per table) on the session's
  connection, so they commit or roll back with the rows. Then each value
  about to be written is replaced in the instance's ``__dict__`` by a
  :class:`RowValue` (value + key), which the ORM copies into the INSERT or
  UPDATE parameters; ``after_flush`` binds the keys of rows whose primary
  key the INSERT made (autoincrement) and puts the plain values back (as
  ``after_soft_rollback`` does when the flush fails). ``add``, ``add_all``, ``merge``
  and attribute updates all end up here.
* ``do_orm_execute``: ORM bulk ``session.execute(insert(Model), [dicts])``
  and bulk UPDATE by primary key (``session.execute(update(Model), [dicts])``)
  get the same treatment on their parameter dicts.

Core statements (``conn.execute(insert(t), rows)``, ``update(t).where(...)``,
upserts) and the legacy bulk methods (``bulk_insert_mappings``,
``bulk_update_mappings``, ``bulk_save_objects``), which run Core statements,
get their row keys from the Core hook (:mod:`.core`), on the statement's
own connection; an explicit ``KeyManager.new_row_key(conn, table).value(v)``
still works (a paired value is left as it is). A bare value that reaches the
bind processor anyway (a statement on a lightweight ``table()``) raises
:class:`~sa_envelope.RowKeyRequiredError` before anything is written.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Sequence

from sqlalchemy import Connection, event
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.state import InstanceState

from ..columns.rowvalue import RowValue
from ..errors import EnvelopeError
from ..keys.cache import CachedKey
from . import binding
from .shred import retire, shred_deleted
from .specs import TableSpec, pk_of, specs

__all__ = ["bound_keys", "install_orm_hooks", "keys_for"]

_RESTORE = "sa_envelope_row_restore"
_BIND = "sa_envelope_row_bind"
_installed = False


def install_orm_hooks() -> None:
    """Listen on every Session (idempotent; the hooks do nothing for models
    without row-scoped columns)."""
    global _installed
    if _installed:
        return
    event.listen(Session, "before_flush", _before_flush)
    event.listen(Session, "after_flush", _after_flush)
    event.listen(Session, "after_soft_rollback", _after_soft_rollback)
    event.listen(Session, "do_orm_execute", _do_orm_execute)
    _installed = True


# -- reading the keys rows already have --------------------------------------------


def bound_keys(conn: Connection, spec: TableSpec, digests: Sequence[bytes]) -> list[CachedKey | None]:
    """The live key bound to each row (by its digest, never by what a stored
    value names), or ``None`` where the row has none (new, or shredded)."""
    rows = spec.manager.rows_for(conn)
    found = binding.find_bound(rows, conn, spec.owner, digests)
    rows.load(conn, rows.missing(k for k, _ in found), table=spec.owner, column=None)
    by_digest: dict[bytes, CachedKey] = {}
    for key_id, digest in found:
        entry = rows.cache.get(key_id)
        if entry is not None and entry.cipher is not None and entry.bound == digest:
            by_digest.setdefault(digest, entry)
    return [by_digest.get(d) for d in digests]


def keys_for(
    conn: Connection, spec: TableSpec, pks: Sequence[tuple[Any, ...] | None], is_update: bool
) -> tuple[list[CachedKey], list[int]]:
    """The key each row's values go under: the one bound to the row (updates),
    else a new one bound to it. Also the positions whose keys could not be
    bound yet (primary key unknown before the INSERT: :func:`_bind_pending`)."""
    rows = spec.manager.rows_for(conn)
    known = any(pk is not None for pk in pks)
    dkey = binding.digest_key(rows, conn, spec.owner, create=True) if known else None
    digests = [binding.row_digest(dkey, pk) if pk is not None else None for pk in pks]
    keys: list[CachedKey | None] = [None] * len(pks)
    if is_update:
        keys = bound_keys(conn, spec, [d for d in digests if d is not None])  # updates know every pk
    else:
        retire(conn, spec, [d for d in digests if d is not None])
    gaps = [i for i, k in enumerate(keys) if k is None]
    made = rows.create(conn, spec.owner, len(gaps), [digests[i] for i in gaps], defer=not is_update)
    for i, key in zip(gaps, made):  # a key made without its digest is inserted by _bind_pending
        keys[i] = key
    return keys, [i for i in gaps if digests[i] is None]  # type: ignore[return-value]


def _known(pk: tuple[Any, ...]) -> tuple[Any, ...] | None:
    return None if any(v is None for v in pk) else pk


# -- flush ---------------------------------------------------------------------------


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
    shred_deleted(session)
    for plan, is_update in ((inserts, False), (updates, True)):
        for spec, items in plan.items():
            conn = session.connection(bind_arguments={"mapper": items[0][0].mapper})
            pks = [_known(pk_of(s, spec)) for s, _ in items]
            restore = session.info.setdefault(_RESTORE, [])
            keys, unbound = keys_for(conn, spec, pks, is_update)
            for (state, attrs), key in zip(items, keys):
                _wrap(restore, state, attrs, key)
            session.info.setdefault(_BIND, []).extend((conn, spec, items[i][0], keys[i]) for i in unbound)


def _bind_pending(session: Session) -> None:
    """Bind the keys of rows whose primary key the INSERT just made."""
    groups: dict[tuple[Connection, TableSpec], list[tuple[InstanceState[Any], CachedKey]]] = defaultdict(list)
    for conn, spec, state, key in session.info.pop(_BIND, ()):
        groups[(conn, spec)].append((state, key))
    for (conn, spec), items in groups.items():
        rows = spec.manager.rows_for(conn)
        dkey = binding.digest_key(rows, conn, spec.owner, create=True)
        digests = [binding.row_digest(dkey, pk_of(state, spec)) for state, _ in items]
        retire(conn, spec, digests)
        rows.bind(conn, spec.owner, [key for _, key in items], digests)


def _after_flush(session: Session, *args: Any) -> None:
    try:
        _bind_pending(session)
    finally:
        _restore(session)


def _after_soft_rollback(session: Session, *args: Any) -> None:
    session.info.pop(_BIND, None)
    _restore(session)


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
        if orm_state.is_update:
            pks: list[tuple[Any, ...] | None] = [_bulk_pk(plist[i], spec) for i, _ in need]
        else:
            pks = [_known(tuple(plist[i].get(a) for a in spec.pk_attrs)) for i, _ in need]
            if any(pk is None for pk in pks):
                continue  # the database makes them: the Core hook (.core) binds the keys after the INSERT
        for (i, attrs), key in zip(need, keys_for(conn, spec, pks, orm_state.is_update)[0]):
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
            f"bulk UPDATE of row-scoped columns of {spec.owner} needs the primary key in every row", table=spec.owner
        ) from None
