"""A migrating column read as one value by any SELECT: the merge in SQL.

While a column migrates online (:mod:`.migrating`), a row's value is in its
*new* half where that is set and in the *old* half otherwise. The ORM's load
hook could merge the two attributes, but a Core ``select(t)`` or
``select(t.c.email__encrypted)`` returns what the database sends: the
shadow, NULL in every row not yet backfilled. So the column's type gives
SQLAlchemy a ``column_expression`` (applied to the columns a SELECT or a
RETURNING returns, never to WHERE clauses) that sends one value::

    COALESCE(email__encrypted, <email as JSON>)      -- encrypting
    COALESCE(<code__plaintext as JSON>, code)        -- decrypting

and a result type (:class:`MergedRead`) that opens an envelope as the column
always does and reads the other form back into the twin's Python type. The
two never collide: an envelope starts with its version byte (0x01, 0x02),
the JSON form with ``[`` (0x5B): ``json_build_array(old)`` /
``JSON_ARRAY(old)`` / ``json_array(old)``, so the database quotes the value
and Python parses it exactly (strings, integers, decimals, booleans, JSON,
dates and times, UUIDs). A twin of another Python type (bytes, an enum) is
returned as stored and merged by the ORM only; so is a column whose twin is
not in the same FROM (a subquery that leaves it out).
"""

from __future__ import annotations

import datetime
import json
import uuid
from decimal import Decimal
from typing import Any, Callable

from sqlalchemy import JSON, LargeBinary, func, type_coerce
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["MergedRead", "merged_expression"]

_JSON_FORM = 0x5B  # "[": the first byte of the old half's form; an envelope's is its version


class _JsonBytes(FunctionElement[bytes]):
    """``[value]`` as a JSON array in bytes, as the database quotes it; NULL
    where the value is NULL (so that ``COALESCE`` picks the other half)."""

    type = LargeBinary()
    inherit_cache = True


@compiles(_JsonBytes)
def _json_bytes(element: Any, compiler: Any, **kw: Any) -> str:  # SQLite, MySQL, MariaDB
    value = compiler.process(element.clauses, **kw)
    if compiler.dialect.name == "sqlite":
        return f"CAST(NULLIF(JSON_ARRAY({value}), '[null]') AS BLOB)"
    return f"CAST(NULLIF(CAST(JSON_ARRAY({value}) AS CHAR), '[null]') AS BINARY)"


@compiles(_JsonBytes, "postgresql")
def _json_bytes_pg(element: Any, compiler: Any, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    return f"convert_to(NULLIF(CAST(json_build_array({value}) AS TEXT), '[null]'), 'UTF8')"


def _twin_of(colexpr: Any, name: str) -> Any:
    """The twin column in ``colexpr``'s own FROM (a table, alias or subquery), or None."""
    for column in getattr(getattr(colexpr, "table", None), "c", ()):
        if column.name == name:
            return column
    return None


def _converter(twin: TypeEngine[Any]) -> Callable[[Any, bool], Any] | None:
    """How an element of the JSON form becomes the twin's Python value
    (``as_text``: the database quotes JSON columns as strings), or None."""
    if isinstance(twin, JSON):
        return lambda v, as_text: json.loads(v, parse_float=Decimal) if as_text and isinstance(v, str) else v
    try:
        python = twin.python_type
    except NotImplementedError:
        return None
    simple: dict[type, Callable[[Any], Any]] = {str: str, bool: bool, int: int, float: float, Decimal: Decimal}
    if python in simple:
        make = simple[python]
        return lambda v, _: make(v) if python is not Decimal else Decimal(str(v))
    if python in (datetime.datetime, datetime.date, datetime.time):
        return lambda v, _: python.fromisoformat(v) if isinstance(v, str) else v
    if python is uuid.UUID:
        return lambda v, _: v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))
    return None


class MergedRead(TypeDecorator[Any]):
    """The result type of a merged read: an envelope is opened by the
    column's own processor, the JSON form read as the twin's value."""

    impl = LargeBinary
    cache_ok = True

    def __init__(self, encrypted: Any, twin: Any) -> None:
        super().__init__()
        self.encrypted, self.twin = encrypted, twin

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return self.encrypted.load_dialect_impl(dialect)  # type: ignore[no-any-return]

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        opened = self.encrypted.result_processor(dialect, coltype)
        convert = _converter(self.twin)
        assert convert is not None  # merged_expression merges only these
        as_text = dialect.name == "sqlite" or bool(getattr(dialect, "is_mariadb", False))

        def process(value: Any) -> Any:
            if value is None:
                return None
            if value[0] == _JSON_FORM:
                element = json.loads(bytes(value), parse_float=Decimal)[0]
                return None if element is None else convert(element, as_text)
            return opened(value) if opened is not None else value

        return process


def merged_expression(encrypted_type: Any, colexpr: Any, twin_name: str, encrypting: bool) -> Any:
    """``colexpr`` (the encrypted half) as the SELECT merging it with
    ``twin_name``; ``colexpr`` itself where the merge cannot be exact."""
    twin = _twin_of(colexpr, twin_name)
    if twin is None or _converter(twin.type) is None:
        return colexpr
    # COALESCE, not CASE ... IS NULL: SQLite 3.40 answers IS NULL wrongly in some UPDATE ... RETURNING
    halves = (colexpr, _JsonBytes(twin)) if encrypting else (_JsonBytes(twin), colexpr)  # the new half first
    return type_coerce(func.coalesce(*halves), MergedRead(encrypted_type, twin.type))
