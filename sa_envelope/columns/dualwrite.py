"""Both halves of a migrating column, written by every statement and merged on read.

While a column is encrypted (or decrypted) online, its two halves must
never disagree: the backfill (:mod:`sa_envelope.jobs.backfill`) only fills
the new half where it is still NULL, with a compare-and-set on the old
half, so everything rests on the application writing both, in the same
statement. Two hooks do it:

* :func:`rewrite` (the KeyManager's engine, ``before_execute``): an INSERT or
  UPDATE that sets one half gets the other half set to the same value,
  whether the value is in the statement's parameters (the ORM's flush,
  ``conn.execute(stmt, rows)``) or in ``values(...)``. It refuses what it
  cannot copy (a SQL expression, a multi-row ``VALUES``) and two halves set
  to different values.
* the ORM hooks (:func:`install`): the flush copies a changed attribute to
  its twin's attribute before it builds the statement (the identity map
  stays true), and a loaded instance shows the new half where it is set and
  the old one otherwise, on the attribute of the encrypted column.

Core SELECTs (and RETURNING) get the merged value from the type's
``column_expression`` (:mod:`.merged`); the ORM's load hook merges what it
could not (a twin of a type the SQL merge does not read back).
A row-scoped half keeps its row key: the ORM pairs the value with it, and a
copy made here is a bare value that the Core row-key hook pairs next
(this hook runs first: it is installed with the engine, the row keys later).
"""

from __future__ import annotations

import weakref
from itertools import chain
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null

from ..errors import UnsupportedQueryError
from ..keys.listeners import Listeners
from .migrating import ENCRYPTING, Pair, column_named, pairs_of
from .rowvalue import RowValue
from .writeguard import upsert_assignments

__all__ = ["install", "rewrite"]

_UNSET = object()


def _refuse(table: Any, pair: Pair, why: str) -> UnsupportedQueryError:
    return UnsupportedQueryError(
        f"{table.fullname}.{pair.encrypted} is migrating with {pair.plaintext}: {why}; every write must set "
        "both halves to one value (pass Python values, or one half only)",
        table=table.fullname,
        column=pair.encrypted,
    )


def _resolve(stmt: Any, table: Any, key: Any) -> Any:
    """The column a ``values()`` key names: a Column, or a string that is an
    ORM attribute name (ORM-enabled statements) or a column key."""
    if not isinstance(key, str):
        return getattr(key, "__clause_element__", lambda: key)()
    mapper = getattr(stmt, "_propagate_attrs", {}).get("plugin_subject")
    prop = getattr(getattr(mapper, "mapper", None), "attrs", {}).get(key) if mapper is not None else None
    if prop is not None and hasattr(prop, "columns"):
        return prop.columns[0]
    return table.c.get(key)


def _bare(value: Any) -> Any:
    """A row-scoped half's value without its row key (the ORM pairs them):
    the twin gets the value; the Core row-key hook pairs the copy."""
    return value.value if type(value) is RowValue else value


def _python_value(value: Any) -> Any:
    """The Python value a ``values()`` entry writes, or ``_UNSET`` if it is SQL."""
    if value is None or isinstance(value, Null):
        return None
    if not isinstance(value, ClauseElement):
        return _bare(value)
    if isinstance(value, BindParameter) and value.callable is None:
        return _Named(value.key) if value.required else _bare(value.value)
    return _UNSET


class _Named(str):
    """A ``values()`` entry that is a bind parameter valued per parameter set
    (``values(body=bindparam("b"))``): its name."""


def _sync_values(stmt: Any, table: Any, pair: Pair, enc: Any, plain: Any) -> tuple[Any, tuple[str, str] | None]:
    """``values()`` that set one half set the other: only the missing half is
    added, under the column's key, so that a later hook's entry for it (the
    Core row-key hook pairs a row-scoped value) replaces it, never doubles it.
    A half set from a named parameter returns (that name, the other half's
    key): the parameter sets carry the copy, as SQLAlchemy sets a column from
    a parameter named by its key."""
    if stmt._multi_values:
        raise _refuse(table, pair, "a multi-row VALUES cannot be copied; pass a list of parameter dicts to execute()")
    found: dict[str, tuple[Any, Any]] = {}  # column name -> (the values() key, its Python value)
    for key, value in (stmt._values or {}).items():
        name = getattr(_resolve(stmt, table, key), "name", None)
        if name in (pair.encrypted, pair.plaintext):
            found[name] = (key, _python_value(value))
    if not found:
        return stmt, None
    values = {name: value for name, (_, value) in found.items()}
    if _UNSET in values.values():
        raise _refuse(table, pair, "a SQL expression cannot be written to both halves")
    named = [v for v in values.values() if type(v) is _Named]
    if named:  # the other half takes the same parameter, set by name in each parameter set
        if len(values) == 2 and values[pair.encrypted] != values[pair.plaintext]:
            raise _refuse(table, pair, "this statement sets the two halves from different parameters")
        target = plain if pair.encrypted in values else enc
        return stmt, (None if len(values) == 2 else (str(named[0]), target.key))
    set_values = [v for v in values.values() if v is not None]
    if len(set_values) == 2 and set_values[0] != set_values[1]:
        raise _refuse(table, pair, "this statement sets the two halves to different values")
    value = set_values[0] if set_values else None
    missing = {
        found[column.name][0] if column.name in found else column.key: value
        for column in (enc, plain)
        if values.get(column.name) is None and (value is not None or column.name not in found)
    }
    return (stmt.values(missing) if missing else stmt), None


def _sync_params(params: Any, table: Any, pair: Pair, enc_key: str, plain_key: str) -> Any:
    has_e, has_p = enc_key in params, plain_key in params
    if not (has_e or has_p):
        return params
    value_e, value_p = _bare(params.get(enc_key)), params.get(plain_key)
    if has_e and has_p:
        if value_e is None or value_p is None:
            if value_e is value_p:
                return params
        elif value_e == value_p:
            return params
        else:
            raise _refuse(table, pair, "this statement sets the two halves to different values")
    if value_e is not None:  # the encrypted half keeps its row key, if it has one
        return {**params, plain_key: value_e}
    return {**params, enc_key: value_p, plain_key: value_p}


def _check_upsert(stmt: Any, table: Any, pair: Pair) -> None:
    """An upsert's SET (``on_conflict_do_update``, ``on_duplicate_key_update``)
    must write both halves or neither: the row it updates would keep the other
    half's old value. Refused rather than rewritten: a value given in the SET
    is the user's expression, ``excluded.<half>`` names the proposed row."""
    written = {getattr(_resolve(stmt, table, key), "name", None) for key, _ in upsert_assignments(stmt)}
    halves = written & {pair.encrypted, pair.plaintext}
    if len(halves) == 1:
        (name,) = halves
        other = pair.plaintext if name == pair.encrypted else pair.encrypted
        raise _refuse(
            table,
            pair,
            f"this upsert's SET writes {name} without {other}: set both "
            f"(set_={{{name!r}: stmt.excluded.{name}, {other!r}: stmt.excluded.{other}}})",
        )


def rewrite(conn: Any, stmt: Any, multiparams: Any, params: Any, execution_options: Any) -> Any:
    """``before_execute`` (retval): an INSERT/UPDATE writes both halves."""
    if not (getattr(stmt, "is_insert", False) or getattr(stmt, "is_update", False)):
        return stmt, multiparams, params
    table = getattr(stmt, "table", None)
    pairs = pairs_of(table) if table is not None else {}
    for pair in pairs.values():
        enc, plain = column_named(table, pair.encrypted), column_named(table, pair.plaintext)
        if stmt.is_insert:
            _check_upsert(stmt, table, pair)
        stmt, copy = _sync_values(stmt, table, pair, enc, plain)
        if copy is not None:
            source, target = copy
            multiparams = [{**p, target: _bare(p.get(source))} for p in multiparams]
            params = {**params, target: _bare(params.get(source))} if params else params
            continue
        multiparams = [_sync_params(p, table, pair, enc.key, plain.key) for p in multiparams]
        if params:
            params = _sync_params(params, table, pair, enc.key, plain.key)
    return stmt, multiparams, params


# -- the ORM: the flush copies, the load merges -------------------------------------------------

_PAIRS: weakref.WeakKeyDictionary[Mapper[Any], tuple[tuple[str, str, str], ...]] = weakref.WeakKeyDictionary()
_installed = False


def _attr_pairs(mapper: Mapper[Any]) -> tuple[tuple[str, str, str], ...]:
    """(encrypted attribute, plaintext attribute, direction) of ``mapper``."""
    found = _PAIRS.get(mapper)
    if found is None:
        out = []
        for table in mapper.tables:
            for pair in pairs_of(table).values():
                enc = mapper.get_property_by_column(column_named(table, pair.encrypted))
                plain = mapper.get_property_by_column(column_named(table, pair.plaintext))
                out.append((enc.key, plain.key, pair.direction))
        found = _PAIRS[mapper] = tuple(out)
    return found


def _copy_changes(session: Session, flush_context: Any, instances: Any) -> None:
    """A changed half is copied to its twin's attribute before the flush."""
    for obj in chain(session.new, session.dirty):
        state = orm_attributes.instance_state(obj)
        changed = state.dict if state.key is None else state.committed_state
        for enc_attr, plain_attr, _ in _attr_pairs(state.mapper):
            if (enc_attr in changed) != (plain_attr in changed):
                source, target = (enc_attr, plain_attr) if enc_attr in changed else (plain_attr, enc_attr)
                setattr(obj, target, _bare(state.dict.get(source)))


def _merge_loaded(state: Any, *_: Any) -> None:
    """The encrypted column's attribute shows the new half where it is set."""
    for enc_attr, plain_attr, direction in _attr_pairs(state.mapper):
        new, old = (enc_attr, plain_attr) if direction == ENCRYPTING else (plain_attr, enc_attr)
        if new in state.dict and old in state.dict:
            merged = state.dict[new] if state.dict[new] is not None else state.dict[old]
            state.dict[enc_attr] = merged


def install(listeners: Listeners) -> None:
    """Rewrite writes on the engine of ``listeners`` (once per engine, however
    many managers are bound to it); listen on every Session and mapper once
    (one dict lookup per load for models without migrating columns)."""
    listeners.share("before_execute", rewrite, retval=True)
    global _installed
    if not _installed:
        event.listen(Session, "before_flush", _copy_changes, insert=True)  # before the row keys pair values
        event.listen(Mapper, "load", _merge_loaded, raw=True)
        event.listen(Mapper, "refresh", _merge_loaded, raw=True)
        _installed = True
