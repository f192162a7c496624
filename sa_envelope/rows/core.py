"""Row keys for Core writes: every INSERT and UPDATE of a row-scoped column.

The ORM hooks (:mod:`.orm`) pair each row-scoped value with its row's key
before a flush. Core statements reach the engine with bare values:
``conn.execute(insert(t), rows)``, ``insert().values(...)`` (one row or
several), ``update(t).where(t.c.id == 5).values(...)``, upserts, and the
legacy ORM bulk methods (``bulk_insert_mappings``, ``bulk_update_mappings``,
``bulk_save_objects``), which run Core statements. A ``before_execute``
listener with ``retval=True`` on the manager's engine rewrites those before
they compile: it makes the statement's row keys in bulk (one executemany per
statement, :meth:`RowKeys.create`) on the statement's own connection, in
its transaction, and hands the column :class:`RowValue` pairs instead of the
bare values. Values already paired (the ORM's, ``new_row_key(...).value(v)``)
are left as they are, so this costs the ORM nothing but a dictionary lookup.

Which key a row gets, as in the ORM (:mod:`.binding`: keys are bound to the
row's primary key digest):

* INSERT with the primary key in the values: a new key bound to the row;
  live keys an earlier row with that primary key left are shredded once the
  INSERT succeeded (``after_execute``; as :func:`.shred.retire` does for the ORM).
* INSERT whose primary key the database makes (autoincrement): a new key,
  bound after the INSERT ran (``after_execute``) from
  ``inserted_primary_key_rows``; an executemany gets ``return_defaults()``
  for that (RETURNING, on every backend the suite runs). Refused where the
  primary keys cannot be known: ``returning()`` or multi-row ``values([...])``
  without them.
* UPDATE identified by its primary key (``where(t.c.id == 5)``, or
  ``== bindparam("pid")`` with one parameter set per row): the key bound to
  the row, or a new bound key if it has none. An UPDATE of row-scoped columns
  that does not name its rows' primary keys is refused: one statement would
  write one ciphertext into rows with different keys.
* Upserts (``on_conflict_do_update``, ``on_duplicate_key_update``): the key
  bound to the row if there is one, else a new bound key, so the key is right
  whether the row is inserted or updated; the conflict must be on the primary
  key (:func:`.upserts.check_upsert`).

Refusals are :class:`~sa_envelope.UnsupportedQueryError`, raised before any
key or row is written.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, Table, event

from ..columns.rowvalue import RowValue
from ..keys.cache import CachedKey
from . import binding
from .keys import RowKeys
from .orm import keys_for
from .shred import retire
from .specs import TableSpec, core_spec
from .upserts import check_upsert, is_upsert
from .writeplan import PASS_PK, Plan, any_bare, as_dict, bare, known, literal, plan_for, python_defaults, refused

__all__ = ["install_core_hook"]

_NO_SPEC: Any = object()


def install_core_hook(rows: RowKeys, manager: Any) -> None:
    """Listen on one bound engine of the manager (once per engine, as its row keys are made)."""
    hook = _CoreWrites(manager)
    engine = rows.store.engine
    event.listen(engine, "before_execute", hook.before, retval=True)
    event.listen(engine, "after_execute", hook.after)


class _CoreWrites:
    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.specs: weakref.WeakKeyDictionary[Table, Any] = weakref.WeakKeyDictionary()
        self.pending_key = f"sa_envelope_core_pending_{id(self)}"

    def spec(self, table: Any) -> TableSpec | None:
        table = table._deannotate()
        if not isinstance(table, Table):
            return None
        found = self.specs.get(table, _NO_SPEC)
        if found is _NO_SPEC:
            found = self.specs[table] = core_spec(self.manager, table)
        return found  # type: ignore[no-any-return]

    def before(self, conn: Connection, stmt: Any, multiparams: Any, params: Any, options: Any) -> Any:
        if not getattr(stmt, "is_dml", False) or not (stmt.is_insert or stmt.is_update):
            return stmt, multiparams, params
        spec = self.spec(stmt.table)
        if spec is None:
            return stmt, multiparams, params
        plist: list[Mapping[str, Any]] = list(multiparams) if multiparams else [params]
        if stmt.is_insert and stmt._multi_values:
            return self._multi_values(conn, spec, stmt, multiparams, params)
        if not (
            stmt._values
            or getattr(stmt, "_ordered_values", None)
            or any_bare(spec, plist)
            or python_defaults(spec, stmt.is_update)
        ):
            return stmt, multiparams, params  # the ORM's flush: every value already paired
        plan = plan_for(spec, stmt, plist)
        if not any(plan.values):
            return stmt, multiparams, params
        if stmt.is_update:
            keys = _update_keys(conn, plan)
            return _rewrite(stmt, plan, plist, keys, multiparams)
        if any(plan.pks[i] is None for i in _rows_needing_keys(plan)):
            stmt = _fetch_pks(conn, stmt, plan, len(plist))  # refused here, before any key is made
        keys, unbound, digests = _insert_keys(conn, plan, stmt)
        rewritten = _rewrite(stmt, plan, plist, keys, multiparams)
        self._after_insert(conn, rewritten[0], spec, keys, unbound, digests)
        return rewritten

    def _after_insert(
        self, conn: Connection, stmt: Any, spec: TableSpec, keys: list[Any], unbound: list[int], digests: list[bytes]
    ) -> None:
        """What :meth:`after` does once the INSERT succeeded: bind the keys of
        rows whose primary key it made, and shred the live keys an earlier row
        with the same primary key left (not before: a failed INSERT of an
        existing primary key, caught on MySQL or SQLite, must not shred the
        existing row's keys)."""
        if unbound or digests:
            made = {k.key_id for k in keys if k is not None}
            conn.info[self.pending_key] = (stmt, spec, [(i, keys[i]) for i in unbound], digests, made)

    def _multi_values(self, conn: Connection, spec: TableSpec, stmt: Any, multiparams: Any, params: Any) -> Any:
        """``insert().values([{...}, {...}])``: one key per row of the VALUES list."""
        rows = [as_dict(spec.table, row) for row in stmt._multi_values[0]]
        plan = Plan(
            spec,
            [{k: literal(r.get(k)) for k in spec.attrs if bare(literal(r.get(k)))} for r in rows],
            [known([literal(r.get(c.key)) for c in spec.pk_cols]) for r in rows],
        )
        if not any(plan.values):
            return stmt, multiparams, params
        if any(plan.pks[i] is None for i in _rows_needing_keys(plan)):
            raise refused(spec, "a multi-row INSERT ... VALUES whose primary keys the database makes", PASS_PK)
        keys, _, digests = _insert_keys(conn, plan, stmt)
        new_rows = []
        for row, values, key in zip(rows, plan.values, keys):
            wrapped = {k: RowValue(v, key) for k, v in values.items()} if key is not None else {}
            new_rows.append({**row, **wrapped})
        new = stmt._generate()
        new._multi_values = (tuple(new_rows),)
        self._after_insert(conn, new, spec, keys, [], digests)
        return new, multiparams, params

    def after(self, conn: Connection, stmt: Any, multiparams: Any, params: Any, options: Any, result: Any) -> None:
        pending = conn.info.get(self.pending_key)
        if pending is None or pending[0] is not stmt:
            return
        del conn.info[self.pending_key]
        _, spec, items, digests, made = pending
        _retire_others(conn, spec, digests, made)
        if items:
            pk_rows = result.inserted_primary_key_rows
            pairs = [(key, tuple(pk_rows[i])) for i, key in items if i < len(pk_rows) and known(pk_rows[i])]
            paired = {id(key) for key, _ in pairs}
            _bind_after(conn, spec, pairs, [key for _, key in items if id(key) not in paired])


# -- keys ------------------------------------------------------------------------------------


def _existing(plan: Plan, i: int) -> CachedKey | None:
    return plan.existing[i] if i < len(plan.existing) else None


def _rows_needing_keys(plan: Plan) -> list[int]:
    """Rows with bare values and no key yet (a row the ORM paired has one)."""
    return [i for i, values in enumerate(plan.values) if values and _existing(plan, i) is None]


def _update_keys(conn: Connection, plan: Plan) -> list[CachedKey | None]:
    need = _rows_needing_keys(plan)
    if any(plan.pks[i] is None for i in need):
        raise refused(
            plan.spec,
            "an UPDATE that does not name its rows' primary keys",
            "update by primary key (where(table.c.id == value), or == bindparam() with one "
            "parameter set per row), or load the rows through the ORM and set the attributes",
        )
    return _spread(plan, need, keys_for(conn, plan.spec, [plan.pks[i] for i in need], True)[0])


def _insert_keys(conn: Connection, plan: Plan, stmt: Any) -> tuple[list[CachedKey | None], list[int], list[bytes]]:
    """One key per row with row-scoped values; the rows whose keys are bound
    only after the INSERT (primary key made by the database); the digests of
    the rows whose earlier keys go once the INSERT succeeded."""
    need = _rows_needing_keys(plan)
    pks = [plan.pks[i] for i in need]
    if is_upsert(stmt):  # the row may exist: its bound key, never a shred
        check_upsert(plan.spec, stmt)
        if any(pk is None for pk in pks):
            raise refused(plan.spec, "an upsert without the primary key of every row", PASS_PK)
        return _spread(plan, need, keys_for(conn, plan.spec, pks, True)[0]), [], []
    rows, owner = plan.spec.manager.rows_for(conn), plan.spec.owner
    dkey = binding.digest_key(rows, conn, owner, create=True) if any(pk is not None for pk in pks) else None
    digests = binding.row_digests(dkey, pks) if dkey is not None else [None] * len(pks)
    made = rows.create(conn, owner, len(pks), digests, defer=True)  # bound and inserted by after()
    unbound = [need[j] for j, d in enumerate(digests) if d is None]
    return _spread(plan, need, made), unbound, [d for d in digests if d is not None]


def _spread(plan: Plan, need: list[int], keys: Sequence[CachedKey]) -> list[CachedKey | None]:
    out: list[CachedKey | None] = [None] * len(plan.values)
    for i, key in zip(need, keys):
        out[i] = key
    return out


def _fetch_pks(conn: Connection, stmt: Any, plan: Plan, count: int) -> Any:
    """The statement that tells the rows' new primary keys after it ran."""
    if stmt._returning and not is_upsert(stmt):
        raise refused(plan.spec, "an INSERT ... RETURNING whose primary keys the database makes", PASS_PK)
    if count <= 1 or stmt._return_defaults or is_upsert(stmt):  # upserts: refused by _insert_keys
        return stmt
    if not conn.dialect.insert_executemany_returning_sort_by_parameter_order:
        raise refused(plan.spec, f"an executemany INSERT on {conn.dialect.name} without the primary keys", PASS_PK)
    return stmt.return_defaults(*plan.spec.pk_cols, sort_by_parameter_order=True)


def _retire_others(conn: Connection, spec: TableSpec, digests: list[bytes], keep: set[int]) -> None:
    """Shred the live keys bound to these rows but the ones just made (see :func:`.shred.retire`)."""
    if digests:
        rows = spec.manager.rows_for(conn)
        found = binding.find_bound(rows, conn, spec.owner, digests)
        rows.shred_keys(conn, [key_id for key_id, _ in found if key_id not in keep], spec.owner)


def _bind_after(
    conn: Connection, spec: TableSpec, pairs: list[tuple[CachedKey, tuple[Any, ...]]], unknown: list[CachedKey]
) -> None:
    """Bind (and, deferred, insert) the keys of rows whose primary key the
    INSERT just made; ``unknown``: keys of rows whose primary key it did not tell."""
    rows = spec.manager.rows_for(conn)
    bound: list[tuple[CachedKey, bytes]] = []
    if pairs:
        dkey = binding.digest_key(rows, conn, spec.owner, create=True)
        digests = binding.row_digests(dkey, [pk for _, pk in pairs])
        bound = [(key, d) for (key, _), d in zip(pairs, digests) if d is not None]
        retire(conn, spec, [d for _, d in bound])
    rows.bind(conn, spec.owner, bound, unknown)


# -- the rewritten statement -----------------------------------------------------------------


def _rewrite(
    stmt: Any, plan: Plan, plist: list[Mapping[str, Any]], keys: list[CachedKey | None], multiparams: Any
) -> Any:
    keys = [key or _existing(plan, i) for i, key in enumerate(keys)]
    fixed_key = next((k for k in keys if k is not None), None)
    if plan.fixed and fixed_key is not None:
        stmt = stmt.values({k: RowValue(v, fixed_key) for k, v in plan.fixed.items()})
    out: list[dict[str, Any]] = []
    for params, values, key in zip(plist, plan.values, keys):
        new = dict(params)
        if key is not None:
            for k, v in values.items():
                if k not in plan.fixed:
                    new[plan.names.get(k, k)] = RowValue(v, key)
        out.append(new)
    if multiparams:
        return stmt, out, {}
    return stmt, [], out[0]
