"""Encrypted values found without the application's models, and opened one by one.

``verify``, ``export`` and the CLI's ``reencrypt`` work on a database they
know only by its URL. Tables are reflected; a binary column is taken as
encrypted when every value of a sample of its first values has the shape of
an envelope (a known version byte, a key id in range, at least the shortest
envelope's length). The key table is *not* asked: a column whose key rows
were deleted must still be found, or a lost key would read as "nothing to
check". Each value is then opened with the key its header names and the
``table.column`` it is bound to (:class:`Opener`), and a failure is sorted
into what an operator does about it (:data:`KINDS`): configure the right
provider, restore a key row, or look at one tampered value.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import Column, Connection, LargeBinary, MetaData, PrimaryKeyConstraint, Table, inspect, select
from sqlalchemy.types import _Binary

from ..columns.encrypted import EncryptedType
from ..envelope import format as fmt
from ..errors import (
    ConfigurationError,
    DecryptionError,
    EnvelopeError,
    KeyNotFoundError,
    KeyProviderError,
    UnauthenticatedKeyError,
)
from ..keys import table as kt
from ..keys.store import KeyStore

__all__ = [
    "ERASED",
    "KINDS",
    "MISSING",
    "Opened",
    "Opener",
    "SKIP_TABLES",
    "SAMPLE",
    "encrypted_columns",
    "pk_text",
    "primary_key",
    "reflect",
    "reflected_columns",
    "table_names",
]

SKIP_TABLES = ("alembic_version",)
SAMPLE = 20  # values per column whose shape decides whether it is encrypted

OK = "ok"
ERASED = "erased"  # the row key was shredded: unreadable on purpose, not a failure
MISSING = "missing_key"
UNWRAP = "cannot_unwrap"
BAD_KEY = "key_not_authentic"
BAD_VALUE = "value_not_authentic"
KINDS = {  # failure kinds, in the order reports list them, with their label
    MISSING: "missing key",
    UNWRAP: "cannot unwrap",
    BAD_KEY: "key does not authenticate",
    BAD_VALUE: "value does not authenticate",
}


@dataclass(frozen=True)
class Opened:
    """One value's outcome: ``plaintext`` when ``kind`` is ``ok``, else why not."""

    key: str  # the key id its header names, as ``keys list`` shows it ("-": no header)
    kind: str
    plaintext: bytes | None = None
    reason: str = ""


def table_names(store: KeyStore, tables: Iterable[str] | None = None) -> list[str]:
    """``tables``, or every table but the key table and Alembic's."""
    if tables:
        return list(tables)
    skip = (store.table.name, *SKIP_TABLES)
    return [t for t in inspect(store.engine).get_table_names() if t not in skip]


def reflect(conn: Connection, name: str) -> Table:
    return Table(name, MetaData(), autoload_with=conn)


def primary_key(table: Table, given: Sequence[str]) -> tuple[Any, ...]:
    """One row's primary key from the CLI's ``--pk`` texts, in the order of
    the table's primary key (as reflected: the order row digests use).

    A one-column key takes ``VALUE`` (or ``NAME=VALUE``); a composite key
    takes ``NAME=VALUE`` once for each of its columns, in any order. Each
    value is read as its column's Python type (numbers, UUIDs, ISO dates),
    as the application's own primary keys are."""
    columns = list(table.primary_key.columns)
    names = ", ".join(c.name for c in columns)
    if not columns:
        raise ConfigurationError(f"table {table.name} has no primary key")
    if len(columns) == 1 and len(given) == 1:
        text = given[0]
        prefix = f"{columns[0].name}="
        return (_typed(table, columns[0], text[len(prefix) :] if text.startswith(prefix) else text),)
    pairs = [text.partition("=") for text in given]
    found = {name: value for name, sep, value in pairs if sep}
    if len(found) != len(given) or set(found) != {c.name for c in columns}:
        raise ConfigurationError(
            f"the primary key of {table.name} is ({names}): give --pk NAME=VALUE once for each of its columns"
        )
    return tuple(_typed(table, c, found[c.name]) for c in columns)


_PARSERS: dict[type, Any] = {
    int: int,
    float: float,
    decimal.Decimal: decimal.Decimal,
    uuid.UUID: uuid.UUID,
    dt.date: dt.date.fromisoformat,
    dt.datetime: dt.datetime.fromisoformat,
    dt.time: dt.time.fromisoformat,
}


def _typed(table: Table, column: Column[Any], text: str) -> Any:
    try:
        kind = column.type.python_type
    except NotImplementedError:
        return text
    parse = _PARSERS.get(kind)
    try:
        return text if parse is None else parse(text)
    except (ValueError, decimal.InvalidOperation):
        raise ConfigurationError(f"--pk {text!r} is not a value of {table.name}.{column.name}") from None


def pk_text(columns: Sequence[Any], values: Sequence[Any]) -> str:
    """A row named by its primary key, as reports print it and ``--pk`` takes
    it: ``id=3``, or ``a=3, b=7`` (each ``NAME=VALUE`` is one ``--pk``)."""
    if not columns:
        return "(no primary key)"
    return ", ".join(f"{getattr(c, 'name', c)}={v}" for c, v in zip(columns, values))


def _envelope_shaped(value: Any) -> bool:
    data = bytes(value)
    try:
        version, key_id = fmt.read_header(data)
    except fmt.InvalidEnvelope:
        return False
    shortest = fmt.SIV_OVERHEAD if version == fmt.VERSION_SIV else fmt.GCM_OVERHEAD
    return fmt.is_key_id(key_id) and len(data) >= shortest


def encrypted_columns(conn: Connection, table: Table) -> list[str]:
    """Names of the binary columns of ``table`` whose sampled values are all envelopes."""
    found = []
    for col in table.columns:
        if not isinstance(col.type, (_Binary, LargeBinary)):
            continue
        stmt = select(col).where(col.is_not(None)).limit(SAMPLE)
        sample = conn.execute(stmt).scalars().all()
        if sample and all(_envelope_shaped(v) for v in sample):
            found.append(col.name)
    return found


class Opener:
    """Opens values with the store's keys; remembers each key that failed, so
    that a million values under one missing key cost one key-table query."""

    def __init__(self, store: KeyStore, lookups: Connection) -> None:
        self.store, self.lookups = store, lookups
        self._failed: dict[tuple[int, str, str], Opened] = {}

    def open(self, value: Any, table: str, column: str, context: bytes) -> Opened:
        data = bytes(value)
        try:
            version, key_id = fmt.read_header(data)
        except fmt.InvalidEnvelope as exc:
            return Opened("-", BAD_VALUE, reason=str(exc))
        shown = fmt.format_key_id(key_id)
        failed = self._failed.get((key_id, table, column))
        if failed is not None:
            return failed
        try:
            key = self.store.decryption_key(key_id, table=table, column=column)
        except EnvelopeError as exc:
            outcome = self._key_failure(key_id, shown, exc)
            self._failed[(key_id, table, column)] = outcome
            return outcome
        try:
            if version != key.head[0]:
                raise fmt.InvalidEnvelope("format version does not match the key's algorithm")
            return Opened(shown, OK, plaintext=fmt.open_value(key.cipher, version, data, context))
        except fmt.InvalidEnvelope as exc:
            return Opened(shown, BAD_VALUE, reason=str(exc))

    def _key_failure(self, key_id: int, shown: str, exc: EnvelopeError) -> Opened:
        """Sort a key that did not load: gone, erased, or not ours to unwrap."""
        if isinstance(exc, KeyNotFoundError):
            record = kt.get_record(self.lookups, self.store.table, key_id) if fmt.is_key_id(key_id) else None
            if record is not None and record.status == kt.SHREDDED:
                return Opened(shown, ERASED, reason=str(exc))
            return Opened(shown, MISSING, reason=str(exc))
        if isinstance(exc, UnauthenticatedKeyError):
            return Opened(shown, BAD_KEY, reason=str(exc))
        if isinstance(exc, KeyProviderError):
            return Opened(shown, UNWRAP, reason=str(exc))
        if isinstance(exc, DecryptionError):
            return Opened(shown, BAD_KEY, reason=str(exc))
        raise exc


def reflected_columns(keys: Any, key_id: int | str, names: Iterable[str] | None = None) -> list[Column[Any]]:
    """The encrypted columns of the table that owns ``key_id``, found without models.

    For the CLI: the table is reflected and its encrypted columns found by
    their values (:func:`encrypted_columns`). Each is declared ``EncryptedType(LargeBinary,
    keys)``, which re-seals the decrypted bytes exactly as they were (the
    inner type's serialisation is kept, whatever the type), deterministic
    when the key is. ``names`` restricts them.
    """
    store = keys.store
    kid = fmt.parse_key_id(key_id) if isinstance(key_id, str) else key_id
    with store.engine.connect() as conn:
        record = kt.get_record(conn, store.table, kid)
        if record is None:
            raise KeyNotFoundError(key_id=fmt.format_key_id(kid))
        if record.scope not in (kt.SCOPE_TABLE, kt.SCOPE_DETERMINISTIC):
            raise ConfigurationError(
                f"key {fmt.format_key_id(kid)} is a {record.scope} key of {record.owner_table}: only table "
                "and deterministic keys are re-encrypted (shred a row key instead)"
            )
        reflected = reflect(conn, record.owner_table)
        found = encrypted_columns(conn, reflected)
    chosen = list(names) if names else found
    strays = [n for n in chosen if n not in found]
    if strays:
        raise ConfigurationError(f"{record.owner_table} has no encrypted column {', '.join(strays)}")
    deterministic = record.scope == kt.SCOPE_DETERMINISTIC

    def declared(col: Column[Any]) -> Column[Any]:
        if col.name not in chosen:
            return Column(col.name, col.type)
        return Column(col.name, EncryptedType(LargeBinary(), keys, deterministic=deterministic))

    pk = PrimaryKeyConstraint(*(c.name for c in reflected.primary_key.columns))  # in the database's order
    table = Table(record.owner_table, MetaData(), *(declared(c) for c in reflected.columns), pk)
    return [table.c[n] for n in chosen]
