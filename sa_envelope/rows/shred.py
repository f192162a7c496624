"""Shredding rows: every key a row ever had, found and destroyed.

A row's keys are the live row keys bound to it (by its digest,
:mod:`.binding`) and the unbound ones its stored values name (keys made
before rows were bound). ``KeyManager.shred``/``shred_row``, ORM delete
(:func:`shred_deleted`, from ``before_flush``) and the replacement of a
row's keys (:func:`retire`) all come here, on the caller's connection, so a
shred commits or rolls back with the caller's transaction.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from sqlalchemy import Connection, MetaData, Table
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm import attributes as orm_attributes

from ..errors import EnvelopeError
from . import binding
from .keyrows import IN_CHUNK
from .specs import TableSpec, core_spec, pk_of, row_key_ids, specs

__all__ = ["retire", "shred_deleted", "shred_instance", "shred_rows", "shred_table_row"]


def retire(conn: Connection, spec: TableSpec, digests: Sequence[bytes]) -> None:
    """Shred the live keys still bound to rows about to get a new key: an
    earlier row with the same primary key, deleted without the ORM. The new
    key replaces them in the same transaction; a backup of that earlier row
    then stays unreadable."""
    if digests:
        rows = spec.manager.rows_for(conn)
        rows.shred_keys(conn, [key_id for key_id, _ in binding.find_bound(rows, conn, spec.owner, digests)], spec.owner)


def shred_instance(manager: Any, instance: Any) -> list[int]:
    """Shred every row key of ``instance``'s row in its session's transaction."""
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
        shredded += shred_rows(conn, spec, [pk_of(state, spec)])
        session.expire(instance, list(spec.attrs))  # drop the plaintext held in memory
    return shredded


def shred_rows(conn: Connection, spec: TableSpec, pks: Sequence[tuple[Any, ...]]) -> list[int]:
    """Shred, on ``conn``, every live row key these rows ever had: those bound
    to them by digest, and the unbound ones their stored values name (keys
    made before rows were bound, or by the Core API without a primary key).
    A key a stored value names but that is bound to another row is that
    row's (a copied value): it is left alone."""
    rows = spec.manager.rows_for(conn)
    named = {k for ids in row_key_ids(conn, spec, pks).values() for k in ids} if spec.columns else set()
    bound: set[int] = set()
    dkey = binding.digest_key(rows, conn, spec.owner, create=False)
    if dkey is not None:
        bound = {k for k, _ in binding.find_bound(rows, conn, spec.owner, [binding.row_digest(dkey, pk) for pk in pks])}
    live = sorted(bound | binding.unbound_live(rows, conn, spec.owner, named - bound))
    for key_id in live:
        rows.shred_key(conn, key_id, owner=spec.owner)
    return live


def shred_table_row(manager: Any, conn: Connection, table: Table | str, pk: tuple[Any, ...]) -> list[int]:
    """:func:`shred_rows` for a Core table (or only a table name: then the
    keys bound to the row, without reading its stored values)."""
    if isinstance(table, Table):
        spec = core_spec(manager, table)
        if spec is not None:
            return shred_rows(conn, spec, [pk])
        table = table.name
    spec = TableSpec(manager, Table(table, MetaData()), table, (), (), (), (), ())
    return shred_rows(conn, spec, [pk])


def shred_deleted(session: Session) -> None:
    """ORM delete shreds the row's keys in the same transaction (``KeyManager(
    ..., shred_on_delete=False)`` opts out); the row is still there to read."""
    plan: dict[tuple[TableSpec, Mapper[Any]], list[tuple[Any, ...]]] = defaultdict(list)
    for obj in session.deleted:
        state = orm_attributes.instance_state(obj)
        for spec in specs(state.mapper):
            if getattr(spec.manager, "shred_on_delete", True):
                plan[(spec, state.mapper)].append(pk_of(state, spec))
    for (spec, mapper), pks in plan.items():
        conn = session.connection(bind_arguments={"mapper": mapper})
        for start in range(0, len(pks), IN_CHUNK):
            shred_rows(conn, spec, pks[start : start + IN_CHUNK])
