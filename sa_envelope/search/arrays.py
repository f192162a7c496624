"""Array storage: a row's tokens in a ``BIGINT[]`` column of its own table.

On PostgreSQL (``storage="array"``, the default when the KeyManager's
engine is PostgreSQL) an index adds to the indexed table::

    <column>_<kind>_tokens  BIGINT[] NULL      the row's distinct tokens, sorted
    ix_<table>_<column>_<kind>_tokens  USING gin (the column)

A lookup is ``tokens @> ARRAY[needle tokens]`` (every token of a prefix or
substring needle) or ``tokens && ARRAY[buckets]`` (any bucket of a range's
cover): one GIN probe, no join, no second table. The needle's tokens are
made when the statement executes, under each live blind-index key
(:mod:`.keyring`): a row's array holds one key's tokens, so during a
rotation "every token" is one ``@>`` per live key, ORed (:func:`criterion`).
The tokens travel in the
writing statement itself: :func:`rewrite` adds them to the parameters of
every INSERT, UPDATE and upsert that writes an indexed column (ORM flush,
ORM bulk, Core one row or many), so a row and its tokens are one write. A
DELETE needs nothing. The column is left out of the ORM mapping (it is
never loaded with the objects).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

from sqlalchemy import BigInteger, Column, Index, Table, TypeDecorator, and_, cast, event, false, func, literal, or_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.elements import BindParameter, ColumnElement, Null

from ..columns.rowvalue import RowValue
from ..columns.writeguard import upsert_assignments
from ..errors import ConfigurationError, UnsupportedQueryError
from . import keyring

__all__ = [
    "ARRAY_DIALECTS",
    "TokenArray",
    "add_column",
    "choose",
    "column_name",
    "criterion",
    "key_name",
    "refuse_write",
    "rewrite",
    "tokens_value",
]

ARRAY_DIALECTS = ("postgresql",)
_INFO = "sa_envelope_search_tokens"  # Column.info flag of a token column
_ABSENT = object()
_hooked = False


def choose(keys: Any, storage: str | None) -> str:
    """``"array"`` or ``"table"``: as asked, else by the KeyManager's engine."""
    if storage is None:  # decided when the index is declared: the engines bound by then
        dialects = {b.engine.dialect.name for b in getattr(keys, "engines", ())}
        return "array" if dialects and dialects <= set(ARRAY_DIALECTS) else "table"
    if storage not in ("array", "table"):
        raise ConfigurationError(f"storage is 'array' (PostgreSQL) or 'table', got {storage!r}")
    return storage


class TokenArray(TypeDecorator[list[int]]):
    """``BIGINT[]``, bound as its text form ``{t1,t2,...}`` (cast to
    ``BIGINT[]`` in the statement): one ``join`` per row, where the driver's
    list adapter inspects every element."""

    impl = ARRAY(BigInteger)
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        return _as_text  # instead of the list adapter's, not before it

    def process_bind_param(self, value: Any, dialect: Any) -> Any:  # pragma: no cover - bind_processor
        return _as_text(value)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value


def _as_text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    return "{" + ",".join(map(str, value)) + "}"


def column_name(column: str, kind: str) -> str:
    """The name of the token column of a ``kind`` index of ``column``."""
    return f"{column}_{kind}_tokens"


def add_column(table: Table, index: Any) -> Column[Any]:
    """Add the index's token column and its GIN index to ``table``."""
    _hook_mappers()
    name = column_name(index.column, index.kind)
    if name in table.c:
        raise ConfigurationError(f"{table.fullname} already has a column {name!r}", table=index.owner)
    column: Column[Any] = Column(name, TokenArray(), nullable=True, info={_INFO: True})
    table.append_column(column)
    options = {"postgresql_with": index.gin_with} if index.gin_with else {}
    Index(f"ix_{table.name}_{name}"[:63], column, postgresql_using="gin", **options)
    return column


def _hook_mappers() -> None:
    """Keep token columns out of every ORM mapping: an ``instrument_class``
    listener runs before the mapper maps its table's columns."""
    global _hooked
    if not _hooked:
        event.listen(Mapper, "instrument_class", _exclude)
        _hooked = True


def _exclude(mapper: Any, class_: Any) -> None:
    columns = getattr(mapper.local_table, "columns", ())
    names = {c.key for c in columns if c.info.get(_INFO)}
    if names:
        mapper.exclude_properties = set(mapper.exclude_properties or ()) | names


def tokens_value(index: Any, value: Any) -> list[int] | None:
    """What a row's token column holds for ``value``: its sorted tokens, NULL for NULL."""
    if isinstance(value, RowValue):
        value = value.value
    return None if value is None else sorted(index.tokens(value))


def criterion(index: Any, table: Any, inputs: Sequence[bytes], all_required: bool) -> Any:
    """``tokens @> ARRAY[...]`` (all) or ``tokens && ARRAY[...]`` (any), the
    tokens made at execution under each live key (:mod:`.keyring`).

    A row's array holds one key's tokens (the rebuild moves it whole), so
    "all" is ``OR`` over live keys (a slot per key, :func:`.keyring.array_slot_param`);
    an empty slot means no key yet, and ``@> '{}'`` would hold for every row."""
    if not inputs:
        return false()
    target = getattr(table, "c", None)
    column = target[index.tokens_column.key] if target is not None else index.tokens_column
    kind = index.tokens_column.type
    if not all_required:  # any one token will do, under any key
        return column.overlap(keyring.array_union_param(index, inputs, kind))
    slots = [keyring.array_slot_param(index, inputs, i, kind) for i in range(keyring.ARRAY_SLOTS)]
    return and_(func.cardinality(cast(slots[0], ARRAY(BigInteger))) > 0, or_(*[column.contains(s) for s in slots]))


# -- writes ------------------------------------------------------------------------------


def refuse_write(index: Any, why: str) -> UnsupportedQueryError:
    """The one refusal of a write whose tokens cannot follow (both storages)."""
    return UnsupportedQueryError(
        f"{index.owner}: {why}; its search index ({index.name}) would go out of step with the rows",
        table=index.owner,
        column=index.column,
    )


def key_name(k: Any) -> str:
    """A SET / VALUES key's column key (a Column or a string)."""
    return str(getattr(k, "key", k))


def _fixed(index: Any, stmt: Any) -> Any:
    """What a statement's ``.values()`` gives the indexed column: its bind
    (valued by the parameters when named there), None for NULL, or _ABSENT."""
    for k, v in (stmt._values or {}).items():
        if key_name(k) == index.source_column().key:
            if isinstance(v, Null):
                return None
            if isinstance(v, BindParameter) and v.callable is None:
                return v
            raise refuse_write(index, "a statement that sets an indexed column from a SQL expression")
    return _ABSENT


def _value_in(p: dict[str, Any], source: str, fallback: Any) -> Any:
    if source in p:
        return p[source]
    if isinstance(fallback, BindParameter):
        return p.get(fallback.key, fallback.value)
    return fallback


def _default(index: Any) -> Any:
    default = index.source_column().default
    if default is None:
        return None
    if getattr(default, "is_scalar", False):
        return default.arg
    raise refuse_write(index, "an INSERT that leaves an indexed column to a computed default")


def rewrite(conn: Any, stmt: Any, paramsets: Sequence[Any], indexes: list[Any]) -> tuple[Any, list[dict[str, Any]]]:
    """The statement and parameter sets with each written row's tokens added."""
    if conn.dialect.name not in ARRAY_DIALECTS:
        raise ConfigurationError(
            f"{indexes[0].owner}.{indexes[0].column}: array search storage is for PostgreSQL, "
            f"not {conn.dialect.name}; declare the index with storage='table'",
            table=indexes[0].owner,
            column=indexes[0].column,
        )
    if stmt.is_insert and (stmt._multi_values or getattr(stmt, "select", None) is not None):
        why = "a multi-row values([...]) INSERT" if stmt._multi_values else "INSERT ... FROM SELECT"
        raise refuse_write(indexes[0], why)
    out = [dict(p) if isinstance(p, dict) else {} for p in paramsets]
    for index in indexes:
        source, target = index.source_column().key, index.tokens_column.key
        fixed = _fixed(index, stmt)
        if fixed is _ABSENT and source not in out[0] and not stmt.is_insert:
            continue  # an UPDATE that leaves the value (and its tokens) as they are
        fallback = fixed if fixed is not _ABSENT else (_default(index) if stmt.is_insert else None)
        for p in out:
            p[target] = tokens_value(index, _value_in(p, source, fallback))
    if stmt.is_insert and stmt._post_values_clause is not None:
        stmt = _upsert(stmt, indexes)
    return stmt, out


def _upsert(stmt: Any, indexes: list[Any]) -> Any:
    """An ``ON CONFLICT DO UPDATE`` that sets an indexed column sets its tokens too."""
    clause = stmt._post_values_clause
    if getattr(clause, "update_values_to_set", None) is None:
        return stmt  # DO NOTHING: the row keeps its value and its tokens
    sets = dict(upsert_assignments(stmt))  # a dict in SQLAlchemy 2.1, pairs in 2.0; both compile from a dict
    given = {key_name(k): v for k, v in sets.items()}
    added: dict[Any, Any] = {}
    for index in indexes:
        value = given.get(index.source_column().key, _ABSENT)
        if value is _ABSENT:
            continue
        target = index.tokens_column
        if isinstance(value, ColumnElement) and getattr(value, "table", None) is not None and _excluded(value, index):
            added[target.key] = stmt.excluded[target.key]
        elif isinstance(value, (BindParameter, Null)):
            plain = None if isinstance(value, Null) else value.value
            added[target.key] = literal(tokens_value(index, plain), type_=target.type)
        else:
            raise refuse_write(index, "an upsert that sets an indexed column from a SQL expression")
    if not added:
        return stmt
    new_clause = copy.copy(clause)
    new_clause.update_values_to_set = {**sets, **added}
    new = stmt._generate()
    new._post_values_clause = new_clause
    return new


def _excluded(value: Any, index: Any) -> bool:
    return bool(getattr(value.table, "name", None) == "excluded" and value.key == index.source_column().key)
