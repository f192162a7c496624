"""Python values to bytes and back, chosen once per column from its inner type.

The cipher sees bytes only. Each codec is a pair of plain functions picked
when the column is declared, so the per-value path does one dictionary-free
call and no type inspection. A ``TypeDecorator`` inner type gets its own
``process_bind_param`` / ``process_result_value`` around its ``impl``'s codec
(one extra call for those types only), with one neutral dialect, so its
stored bytes are the same on every backend. Every codec round-trips exactly: ``Decimal``
keeps its digits, floats keep their bits, aware datetimes keep their offset.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import types as sqltypes
from sqlalchemy.engine.default import DefaultDialect

__all__ = ["Codec", "UnsupportedValue", "codec_for"]

_DOUBLE = struct.Struct(">d")


class UnsupportedValue(Exception):
    """A value does not fit the column's inner type (no value in the message).

    Each codec's ``encode`` is total: whatever it is given, it returns bytes
    or raises this, never another exception, so nothing a caller passes in
    can surface as a Python error whose message quotes it.
    """


@dataclass(frozen=True)
class Codec:
    """How one inner type turns its Python values into bytes and back."""

    name: str
    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]
    # a C-level encode for the per-value fast path, same bytes as ``encode`` for
    # every value it accepts; it may raise anything, and the caller then calls
    # ``encode``, which says why (columns.fastpath)
    fast_encode: Callable[[Any], bytes] | None = None


def _str_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, str):
            raise UnsupportedValue(f"expected str, got {type(value).__name__}")
        return value.encode("utf-8")

    return Codec("str", encode, bytes.decode, str.encode)  # UTF-8, strict: no Python layer per value


def _int_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UnsupportedValue(f"expected int, got {type(value).__name__}")
        try:  # Python refuses ints of more than 4,300 digits (sys.set_int_max_str_digits)
            return str(value).encode("ascii")
        except ValueError:
            raise UnsupportedValue("int has too many digits to store") from None

    return Codec("int", encode, lambda b: int(b.decode("ascii")))


def _decimal_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, bool) or not isinstance(value, (decimal.Decimal, int, float)):
            raise UnsupportedValue(f"expected Decimal, got {type(value).__name__}")
        if isinstance(value, float):
            value = decimal.Decimal(repr(value))
        if isinstance(value, decimal.Decimal) and value.is_snan():
            raise UnsupportedValue("a signalling NaN is not a storable Decimal")
        return str(value).encode("ascii")

    return Codec("decimal", encode, lambda b: decimal.Decimal(b.decode("ascii")))


def _float_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, bool) or not isinstance(value, (float, int, decimal.Decimal)):
            raise UnsupportedValue(f"expected float, got {type(value).__name__}")
        try:  # 10**400 overflows, Decimal("sNaN") refuses: checked here, not by the caller
            number = float(value)
        except (OverflowError, ValueError):
            raise UnsupportedValue(f"{type(value).__name__} out of a double's range") from None
        return _DOUBLE.pack(number)

    return Codec("float", encode, lambda b: _DOUBLE.unpack(b)[0])


def _bool_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, bool):
            raise UnsupportedValue(f"expected bool, got {type(value).__name__}")
        return b"\x01" if value else b"\x00"

    def decode(data: bytes) -> bool:
        if data not in (b"\x00", b"\x01"):
            raise UnsupportedValue("stored boolean is neither 0 nor 1")
        return data == b"\x01"

    return Codec("bool", encode, decode)


def _iso_codec(kind: type, name: str) -> Codec:
    """ISO 8601 text: exact to the microsecond, keeps a UTC offset if any."""
    parse = kind.fromisoformat  # type: ignore[attr-defined]

    def encode(value: Any) -> bytes:
        if type(value) is not kind and not (kind is dt.datetime and isinstance(value, dt.datetime)):
            raise UnsupportedValue(f"expected {name}, got {type(value).__name__}")
        text: str = value.isoformat()  # type: ignore[attr-defined]
        return text.encode("ascii")

    return Codec(name, encode, lambda b: parse(b.decode("ascii")))


def _uuid_codec(as_uuid: bool) -> Codec:
    def encode(value: Any) -> bytes:
        if isinstance(value, uuid.UUID):
            return value.bytes
        if isinstance(value, str):
            try:
                return uuid.UUID(value).bytes
            except ValueError:
                raise UnsupportedValue("string is not a UUID") from None
        raise UnsupportedValue(f"expected UUID, got {type(value).__name__}")

    if as_uuid:
        return Codec("uuid", encode, lambda b: uuid.UUID(bytes=b))
    return Codec("uuid-str", encode, lambda b: str(uuid.UUID(bytes=b)))


def _json_codec() -> Codec:
    def encode(value: Any) -> bytes:
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise UnsupportedValue(f"not JSON-serialisable: {type(exc).__name__}") from None
        return text.encode("utf-8")

    return Codec("json", encode, lambda b: json.loads(b.decode("utf-8")))


def _bytes_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise UnsupportedValue(f"expected bytes, got {type(value).__name__}")
        return bytes(value)

    return Codec("bytes", encode, bytes)


def _enum_codec(inner: sqltypes.Enum) -> Codec:
    """Store the member's name, as SQLAlchemy's own Enum does."""
    enum_class = inner.enum_class
    names = frozenset(inner.enums)

    def encode(value: Any) -> bytes:
        if enum_class is not None and isinstance(value, enum_class):
            return value.name.encode("utf-8")
        if isinstance(value, str) and value in names:
            return value.encode("utf-8")
        raise UnsupportedValue("value is not one of the enum's members")

    if enum_class is None:
        return Codec("enum-str", encode, lambda b: b.decode("utf-8"))
    members: type[enum.Enum] = enum_class
    return Codec("enum", encode, lambda b: members[b.decode("utf-8")])


def _interval_codec() -> Codec:
    def encode(value: Any) -> bytes:
        if not isinstance(value, dt.timedelta):
            raise UnsupportedValue(f"expected timedelta, got {type(value).__name__}")
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        return str(micros).encode("ascii")

    return Codec("interval", encode, lambda b: dt.timedelta(microseconds=int(b.decode("ascii"))))


# The dialect a TypeDecorator inner type is given: one for every backend, so
# its stored bytes do not depend on where they are stored (sqlalchemy-utils'
# JSONType, say, passes values through untouched on PostgreSQL only).
_NEUTRAL_DIALECT = DefaultDialect()


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(sqltypes.TypeDecorator, name)


def _decorator_codec(inner: sqltypes.TypeDecorator[Any]) -> Codec:
    """A ``TypeDecorator``'s own ``process_bind_param`` / ``process_result_value``
    around the codec of its ``impl`` (sqlalchemy-utils' PhoneNumberType,
    ColorType, JSONType, EmailType; a user's decorator over ``String``)."""
    cls = type(inner)
    if (_overrides(cls, "bind_processor") and not _overrides(cls, "process_bind_param")) or (
        _overrides(cls, "result_processor") and not _overrides(cls, "process_result_value")
    ):
        raise TypeError(
            f"EncryptedType cannot serialise {cls.__name__}: it overrides bind_processor/result_processor; "
            "give it process_bind_param/process_result_value, or encrypt its impl type instead"
        )
    base = codec_for(inner.impl_instance)
    if not (_overrides(cls, "process_bind_param") or _overrides(cls, "process_result_value")):
        return base  # a plain alias of its impl
    bind = inner.process_bind_param if _overrides(cls, "process_bind_param") else None
    result = inner.process_result_value if _overrides(cls, "process_result_value") else None
    base_encode, base_decode, dialect, name = base.encode, base.decode, _NEUTRAL_DIALECT, cls.__name__

    def encode(value: Any) -> bytes:
        if bind is not None:
            try:  # the decorator's own errors may quote the value: only their class goes on
                value = bind(value, dialect)
            except Exception as exc:
                raise UnsupportedValue(f"{name} refused the value ({type(exc).__name__})") from None
        if value is None:
            raise UnsupportedValue(f"{name} turned the value into NULL; store None instead")
        return base_encode(value)

    def decode(data: bytes) -> Any:
        value = base_decode(data)
        return result(value, dialect) if result is not None else value

    return Codec(name, encode, decode)


def codec_for(inner: sqltypes.TypeEngine[Any]) -> Codec:
    """Pick the codec for an inner SQLAlchemy type, or raise ``TypeError``.

    Order matters: ``Enum`` is a ``String``, ``Float`` a ``Numeric``,
    ``Text`` a ``String``; the most specific test comes first.
    """
    if isinstance(inner, sqltypes.Enum):
        return _enum_codec(inner)
    if isinstance(inner, sqltypes.Boolean):
        return _bool_codec()
    if isinstance(inner, sqltypes.JSON):
        return _json_codec()
    if isinstance(inner, sqltypes.Uuid):
        return _uuid_codec(inner.as_uuid)
    if isinstance(inner, sqltypes.Float):
        return _decimal_codec() if inner.asdecimal else _float_codec()
    if isinstance(inner, sqltypes.Numeric):
        return _decimal_codec() if inner.asdecimal else _float_codec()
    if isinstance(inner, sqltypes.Integer):
        return _int_codec()
    if isinstance(inner, sqltypes.DateTime):
        return _iso_codec(dt.datetime, "datetime")
    if isinstance(inner, sqltypes.Date):
        return _iso_codec(dt.date, "date")
    if isinstance(inner, sqltypes.Time):
        return _iso_codec(dt.time, "time")
    if isinstance(inner, sqltypes.Interval):
        return _interval_codec()
    if isinstance(inner, sqltypes._Binary):
        return _bytes_codec()
    if isinstance(inner, sqltypes.String):
        return _str_codec()
    if isinstance(inner, sqltypes.TypeDecorator):  # after Interval, itself a TypeDecorator
        return _decorator_codec(inner)
    raise TypeError(
        f"EncryptedType cannot serialise {type(inner).__name__}; supported: String, "
        "Text, Integer, BigInteger, Numeric, Float, Boolean, Date, DateTime, Time, "
        "Interval, Uuid, Enum, JSON, LargeBinary, and TypeDecorators over these"
    )
