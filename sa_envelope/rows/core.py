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
  bound after the INSERT ran (``after_execute``), in the same transaction,
  to the primary key the database made: from ``inserted_primary_key_rows``
  (an executemany gets ``return_defaults(..., sort_by_parameter_order=True)``
  for that), from the statement's own RETURNING (:mod:`.returning`, which
  adds the primary key and hides it from the caller again), or, where there
  is no sorted RETURNING (MySQL, ``implicit_returning=False``) or SQLAlchemy
  would sort it one row per statement anyway (SQLite), from each row's
  ``lastrowid``, one row per statement in the driver (:mod:`.perrow`). A multi-row
  ``values([...])`` becomes that executemany (:mod:`.multivalues`).
* UPDATE identified by its primary key (``where(t.c.id == 5)``, or
  ``== bindparam("pid")`` with one parameter set per row): the key bound to
  the row, or a new bound key if it has none. An UPDATE of row-scoped columns
  that does not name its rows' primary keys is refused: one statement would
  write one ciphertext into rows with different keys.
* Upserts (``on_conflict_do_update``, ``on_duplicate_key_update``): the key
  bound to the row if there is one, else a new bound key, so the key is right
  whether the row is inserted or updated; the conflict must be on the primary
  key (:func:`.upserts.check_upsert`). A Python value in the SET becomes a
  parameter sealed for each row under that key (:func:`.upserts.with_set`).
* A Python value in ``values()`` of an executemany: a parameter per row too
  (:func:`.writeplan.replace_values`), each row's ciphertext under its key.

Refusals are :class:`~sa_envelope.UnsupportedQueryError`, raised before any
key or row is written.
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping, Sequence

from sqlalchemy import Connection, Table, bindparam
from sqlalchemy.sql.compiler import InsertmanyvaluesSentinelOpts

from ..columns.rowvalue import RowValue
from ..keys.cache import CachedKey
from . import binding, multivalues, returning
from .keys import RowKeys
from .orm import keys_for
from .perrow import LASTROWIDS, folds_set_parameters, install_perrow, one_by_one
from .shred import retire
from .specs import TableSpec, core_spec
from .upserts import check_upsert, is_upsert, per_row_sets, set_writes, with_set
from .writeplan import PASS_PK, Plan, any_bare, bare, known, plan_for, python_defaults, refused, replace_values

__all__ = ["install_core_hook"]

_NO_SPEC: Any = object()
SET = "_sa_env_set_"  # + column key: the per-row parameter standing for an upsert's SET entry
# where the primary keys the INSERT made come from, for after_execute; and the
# rowcount to report when the statement's shape was changed (None: SQLAlchemy's)
_IPK, _RETURNED, _LASTROWID = "inserted_primary_key_rows", "returning", "lastrowid"
_Source = tuple[str, Any, "int | None"]
_FOLDED = "an executemany upsert that SQLAlchemy batches (RETURNING, psycopg2) whose SET writes a row-scoped value"


def install_core_hook(rows: RowKeys, manager: Any) -> None:
    """Listen on one bound engine of the manager (once per engine, as its row
    keys are made), through its binding's listeners (removed on unbind)."""
    hook = _CoreWrites(manager)
    listeners = rows.tracker.listeners
    listeners.listen("before_execute", hook.before, retval=True)
    listeners.listen("after_execute", hook.after)
    install_perrow(listeners)


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
        from_values = stmt.is_insert and bool(stmt._multi_values)
        if from_values:
            kept = self._multi_values(conn, spec, stmt, multiparams, params)
            if kept is not None:
                return kept
            stmt, multiparams = multivalues.as_executemany(
                spec, stmt, multivalues.rows_of(spec, stmt), multiparams, params
            )
            params = {}
        plist: list[Mapping[str, Any]] = list(multiparams) if multiparams else [params]
        sets = set_writes(spec, stmt) if stmt.is_insert and is_upsert(stmt) else {}
        if not (
            stmt._values
            or getattr(stmt, "_ordered_values", None)
            or sets
            or any_bare(spec, plist)
            or python_defaults(spec, stmt.is_update)
        ):
            return stmt, multiparams, params  # the ORM's flush: every value already paired
        plan = plan_for(spec, stmt, plist)
        plan.sets, plan.set_values = sets, per_row_sets(sets, plist)
        if not any(plan.values) and not any(bare(v) for row in plan.set_values for v in row.values()):
            return stmt, multiparams, params
        need = _rows_needing_keys(plan)  # rows the ORM paired have their keys: their defaults still get them
        if stmt.is_update:
            keys = _update_keys(conn, plan, need)
            return _rewrite(stmt, plan, plist, keys, multiparams)
        per_row = False  # run one row per statement (.perrow)
        if sets:  # one SET clause per statement: a parameter per row
            stmt = with_set(stmt, {k: bindparam(SET + k, type_=spec.table.c[k].type) for k in sets})
            if len(plist) > 1 and folds_set_parameters(conn.dialect, stmt, sorted(plist[0])):
                raise refused(spec, _FOLDED, "run the upserts one row per statement")
            per_row = len(plist) > 1
        source: _Source = (_IPK, None, None)
        if any(plan.pks[i] is None for i in need) and not is_upsert(stmt):  # upserts: refused by _insert_keys
            stmt, source = _fetch_pks(conn, stmt, plan, len(plist), from_values)  # refused here, before any key
            per_row = per_row or source[0] == _LASTROWID
        keys, unbound, digests = _insert_keys(conn, plan, stmt, need)
        new, *parameters = _rewrite(stmt, plan, plist, keys, multiparams)
        new = one_by_one(new) if per_row else new  # the statement as executed is the one marked
        self._after_insert(conn, new, spec, keys, unbound, digests, source)
        return (new, *parameters)

    def _after_insert(
        self,
        conn: Connection,
        stmt: Any,
        spec: TableSpec,
        keys: list[Any],
        unbound: list[int],
        digests: list[bytes],
        source: _Source,
    ) -> None:
        """What :meth:`after` does once the INSERT succeeded: bind the keys of
        rows whose primary key it made, and shred the live keys an earlier row
        with the same primary key left (not before: a failed INSERT of an
        existing primary key, caught on MySQL or SQLite, must not shred the
        existing row's keys)."""
        if unbound or digests:
            made = {k.key_id for k in keys if k is not None}
            conn.info[self.pending_key] = (stmt, spec, unbound, [keys[i] for i in unbound], digests, made, source)

    def _multi_values(self, conn: Connection, spec: TableSpec, stmt: Any, multiparams: Any, params: Any) -> Any:
        """``insert().values([{...}, {...}])``: one key per row of the VALUES
        list, or ``None`` when the statement must become an executemany
        (:mod:`.multivalues`)."""
        rows = multivalues.rows_of(spec, stmt)
        plan = multivalues.plan_of(spec, rows)
        need = _rows_needing_keys(plan)
        if not need:
            return stmt, multiparams, params
        if any(plan.pks[i] is None for i in need) or (is_upsert(stmt) and set_writes(spec, stmt)):
            return None
        keys, _, digests = _insert_keys(conn, plan, stmt, need)
        new_rows = []
        for row, values, key in zip(rows, plan.values, keys):
            wrapped = {k: RowValue(v, key) for k, v in values.items()} if key is not None else {}
            new_rows.append({**row, **wrapped})
        new = stmt._generate()
        new._multi_values = (tuple(new_rows),)
        self._after_insert(conn, new, spec, keys, [], digests, (_IPK, None, None))
        return new, multiparams, params

    def after(self, conn: Connection, stmt: Any, multiparams: Any, params: Any, options: Any, result: Any) -> None:
        pending = conn.info.get(self.pending_key)
        if pending is None or pending[0] is not stmt:
            return
        del conn.info[self.pending_key]
        _, spec, unbound, unbound_keys, digests, made, source = pending
        _retire_others(conn, spec, digests, made)
        if source[2] is not None:
            result.context._rowcount = source[2]  # what CursorResult.rowcount reports
        if unbound:
            pk_rows = _made_pks(conn, result, source)
            count = len(pk_rows)
            entries, pks, unknown = [], [], []  # parallel lists: no tuple per row
            for i, key in zip(unbound, unbound_keys):
                pk = known(pk_rows[i]) if i < count else None
                if pk is None:
                    unknown.append(key)
                else:
                    entries.append(key)
                    pks.append(pk)
            try:
                _bind_after(conn, spec, entries, pks, unknown)
            except BaseException:
                # the rows are in, their keys are not: a caller who caught the error must
                # not be able to commit them (MySQL and SQLite keep a transaction open
                # after a failed statement), so the transaction is rolled back here
                conn.rollback()
                raise


# -- keys ------------------------------------------------------------------------------------


def _existing(plan: Plan, i: int) -> CachedKey | None:
    return plan.existing[i] if i < len(plan.existing) else None


def _rows_needing_keys(plan: Plan) -> list[int]:
    """Rows with bare values (or an upsert SET value) and no key yet (a row the ORM paired has one)."""
    sets = plan.set_values or [{}] * len(plan.values)
    return [
        i
        for i, (values, set_values) in enumerate(zip(plan.values, sets))
        if (values or any(bare(v) for v in set_values.values())) and _existing(plan, i) is None
    ]


def _update_keys(conn: Connection, plan: Plan, need: list[int]) -> list[CachedKey | None]:
    if any(plan.pks[i] is None for i in need):
        raise refused(
            plan.spec,
            "an UPDATE that does not name its rows' primary keys",
            "update by primary key (where(table.c.id == value), or == bindparam() with one "
            "parameter set per row), or load the rows through the ORM and set the attributes",
        )
    return _spread(plan, need, keys_for(conn, plan.spec, [plan.pks[i] for i in need], True)[0])


def _insert_keys(
    conn: Connection, plan: Plan, stmt: Any, need: list[int]
) -> tuple[list[CachedKey | None], list[int], list[bytes]]:
    """One key per row with row-scoped values; the rows whose keys are bound
    only after the INSERT (primary key made by the database); the digests of
    the rows whose earlier keys go once the INSERT succeeded."""
    pks = [plan.pks[i] for i in need]
    if is_upsert(stmt):  # the row may exist: its bound key, never a shred; one key per primary key
        check_upsert(plan.spec, stmt)
        if any(pk is None for pk in pks):
            raise refused(plan.spec, "an upsert without the primary key of every row", PASS_PK)
        unique = list(dict.fromkeys(pks))
        found = dict(zip(unique, keys_for(conn, plan.spec, unique, True)[0]))
        return _spread(plan, need, [found[pk] for pk in pks]), [], []
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


def _fetch_pks(conn: Connection, stmt: Any, plan: Plan, count: int, from_values: bool) -> tuple[Any, _Source]:
    """The statement that tells the rows' new primary keys after it ran, and
    where they will be. ``from_values``: the executemany a multi-row VALUES
    became, which must stay all-or-nothing (:mod:`.multivalues`)."""
    spec, dialect = plan.spec, conn.dialect
    if stmt._returning and not stmt._return_defaults:  # the ORM's RETURNING is return_defaults(supplemental_cols=)
        stmt, returned = returning.extend(conn, stmt, spec, count > 1)
        return stmt, (_RETURNED, returned, None)
    if count <= 1:
        return stmt, (_IPK, None, None)
    lastrowid = _lastrowid_at(dialect, plan)
    sorted_returning = dialect.insert_executemany_returning_sort_by_parameter_order and spec.table.implicit_returning
    # a multi-row VALUES was one statement: where a failed statement leaves the transaction
    # open (MySQL, SQLite: there is a lastrowid), it stays all-or-nothing one row at a time;
    # and where SQLAlchemy would run a sorted RETURNING one row per statement anyway
    # (SQLite: no sentinel), the driver's own loop with lastrowid costs a fraction of it
    per_row = lastrowid is not None and (from_values or (_unbatched(dialect) and not stmt._return_defaults))
    if sorted_returning and not per_row:
        stmt = stmt.return_defaults(*spec.pk_cols, sort_by_parameter_order=True)
        return stmt, (_IPK, None, count)
    if lastrowid is None:
        raise refused(spec, f"an executemany INSERT on {dialect.name} without the primary keys", PASS_PK)
    return stmt, (_LASTROWID, (plan.raw_pks, lastrowid), None)


def _unbatched(dialect: Any) -> bool:
    """SQLAlchemy can sort an executemany's RETURNING by parameter order only
    one row per statement on this dialect: no implicit sentinel (SQLite)."""
    return not dialect.insertmanyvalues_implicit_sentinel & InsertmanyvaluesSentinelOpts.ANY_AUTOINCREMENT


def _lastrowid_at(dialect: Any, plan: Plan) -> int | None:
    """Where in the primary key ``cursor.lastrowid`` goes, if it tells the
    one primary-key column the database makes (MySQL, SQLite)."""
    made = {j for pk in plan.raw_pks for j, v in enumerate(pk) if v is None}
    auto = plan.spec.table.autoincrement_column
    if not getattr(dialect, "postfetch_lastrowid", False) or auto is None:
        return None
    at = plan.spec.pk_cols.index(auto) if auto in plan.spec.pk_cols else None
    return at if made == {at} else None


def _made_pks(conn: Connection, result: Any, source: _Source) -> list[Any]:
    """Each parameter set's primary key, once the INSERT ran."""
    kind, detail, _ = source
    if kind == _RETURNED:
        return returning.take_pks(result, detail)
    if kind == _LASTROWID:
        raw_pks, at = detail
        ids = conn.info.pop(LASTROWIDS, None) or []
        return [(*pk[:at], made, *pk[at + 1 :]) for pk, made in zip(raw_pks, ids)]
    return list(result.inserted_primary_key_rows)


def _retire_others(conn: Connection, spec: TableSpec, digests: list[bytes], keep: set[int]) -> None:
    """Shred the live keys bound to these rows but the ones just made (see :func:`.shred.retire`)."""
    if digests:
        rows = spec.manager.rows_for(conn)
        found = binding.find_bound(rows, conn, spec.owner, digests)
        rows.shred_keys(conn, [key_id for key_id, _ in found if key_id not in keep], spec.owner)


def _bind_after(
    conn: Connection, spec: TableSpec, entries: list[CachedKey], pks: list[tuple[Any, ...]], unknown: list[CachedKey]
) -> None:
    """Bind (and, deferred, insert) the keys of rows whose primary key the
    INSERT just made (``entries`` and those primary keys, parallel);
    ``unknown``: keys of rows whose primary key it did not tell."""
    rows = spec.manager.rows_for(conn)
    digests: list[bytes | None] = []
    if entries:
        dkey = binding.digest_key(rows, conn, spec.owner, create=True)
        digests = binding.row_digests(dkey, pks)  # never None: every primary key is known
        retire(conn, spec, [d for d in digests if d is not None])
    rows.bind(conn, spec.owner, entries, digests, unknown)


# -- the rewritten statement -----------------------------------------------------------------


def _rewrite(
    stmt: Any, plan: Plan, plist: list[Mapping[str, Any]], keys: list[CachedKey | None], multiparams: Any
) -> Any:
    """The statement and parameters with each row's row-scoped values paired
    with its key; ``values()`` entries become per-row parameters, as the SET's did (:meth:`_CoreWrites.before`)."""
    keys = [key or _existing(plan, i) for i, key in enumerate(keys)]
    types = {c.key: c.type for c in plan.spec.columns}
    if plan.fixed:
        stmt = replace_values(stmt, {k: bindparam(plan.names[k], type_=types[k]) for k in plan.fixed})
    out: list[dict[str, Any]] = []
    name = plan.names.get if plan.names else None
    sets = plan.set_values if plan.sets else None
    for params, values, key, i in zip(plist, plan.values, keys, range(len(plist))):  # once per row: no lookups
        new = dict(params)
        for k, v in values.items():
            new[k if name is None else name(k, k)] = v if key is None else RowValue(v, key)
        if sets is not None:
            for k, v in sets[i].items():
                new[SET + k] = RowValue(v, key) if key is not None and bare(v) else v
        out.append(new)
    if multiparams:
        return stmt, out, {}
    return stmt, [], out[0]
