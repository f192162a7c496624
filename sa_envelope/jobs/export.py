"""A decrypted export of one table, streamed: for reports and data-subject requests.

Like ``verify``, it needs no application models. The table is reflected,
its encrypted columns are found by the shape of their values
(:mod:`.scan`), and each value is opened with the key its header names.
What the decrypted bytes mean is the inner type's business, which the
database does not record: an encrypted column is read as text (right for
``String``, ``Text`` and ``Enum``; the exact ISO or decimal text for dates,
times, numbers and JSON) unless ``types`` names its inner type
(``{"notes": "JSON"}``, names as in :data:`TYPES`). Rows are streamed with
``yield_per`` (a server-side cursor on PostgreSQL and MariaDB), keys are
looked up on a second connection, and each row is written as it is read, so
memory stays bounded by one batch. A value that does not open stops the
export with the error naming its table, column and key; a value whose row
key was shredded is exported as empty (erased on purpose).
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from sqlalchemy import Table, and_, func, select, types

from ..envelope import format as fmt
from ..envelope.codecs import UnsupportedValue, codec_for
from ..errors import ConfigurationError, DecryptionError, KeyNotFoundError, KeyProviderError
from ..keys.store import KeyStore
from . import scan
from .progress import progress_bar

__all__ = ["FORMATS", "TYPES", "ExportReport", "Output", "export_table"]

FORMATS = ("csv", "jsonl")
TYPES: dict[str, Callable[[], types.TypeEngine[Any]]] = {
    "string": types.String,
    "text": types.Text,
    "integer": types.Integer,
    "biginteger": types.BigInteger,
    "numeric": types.Numeric,
    "float": types.Float,
    "boolean": types.Boolean,
    "date": types.Date,
    "datetime": types.DateTime,
    "time": types.Time,
    "interval": types.Interval,
    "uuid": types.Uuid,
    "json": types.JSON,
    "largebinary": types.LargeBinary,
}


class Output(Protocol):
    """Where the rows go: a text file, stdout, anything with ``write``."""

    def write(self, text: str, /) -> Any: ...


@dataclass
class ExportReport:
    """What an export wrote: rows, columns (encrypted ones named), erased values."""

    table: str
    columns: list[str]
    encrypted: list[str]
    rows: int = 0
    erased: int = 0

    def __str__(self) -> str:
        return (
            f"exported {self.rows} rows of {self.table}: {len(self.columns)} columns, "
            f"{len(self.encrypted)} decrypted ({', '.join(self.encrypted) or 'none'}), {self.erased} erased values"
        )

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows, "columns": self.columns, "decrypted": self.encrypted,
                "erased": self.erased}  # fmt: skip


def _jsonable(value: Any) -> Any:
    """A value as JSON can carry it: text for dates, decimals, UUIDs; base64 for bytes."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    raise TypeError(f"cannot export a {type(value).__name__}")


def _cell(value: Any) -> Any:
    """A value as a CSV cell: JSON text for containers, the rest as JSON would show it."""
    if value is None or isinstance(value, (str, int, float)):
        return "" if value is None else value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=_jsonable)
    return _jsonable(value)


class _Decoder:
    """Turns one column's decrypted bytes into its Python value."""

    def __init__(self, table: str, column: str, type_name: str | None) -> None:
        make = TYPES.get((type_name or "string").lower())
        if make is None:
            raise ConfigurationError(f"unknown type {type_name!r} for {table}.{column}; use one of {', '.join(TYPES)}")
        self.decode = codec_for(make()).decode
        self.table, self.column, self.type_name = table, column, type_name or "String"

    def __call__(self, data: bytes, key: str) -> Any:
        try:
            return self.decode(data)
        except (UnsupportedValue, ValueError, UnicodeDecodeError):
            raise DecryptionError(
                f"decrypted bytes do not read as {self.type_name} (give its type: --type {self.column}=TYPE)",
                table=self.table,
                column=self.column,
                key_id=key,
            ) from None


def _raise(opened: scan.Opened, table: str, column: str) -> None:
    if opened.kind == scan.MISSING:
        raise KeyNotFoundError(table=table, column=column, key_id=opened.key, reason=opened.reason)
    if opened.kind == scan.UNWRAP:
        raise KeyProviderError(
            f"this provider cannot unwrap key {opened.key} of {table}.{column} (configure the provider that "
            f"wrapped it): {opened.reason}",
            table=table,
            column=column,
            key_id=opened.key,
        )
    raise DecryptionError(opened.reason, table=table, column=column, key_id=opened.key)


def _pk_filter(table: Table, pk: str | Sequence[str]) -> Any:
    """The row of ``pk`` (``--pk`` texts: :func:`.scan.primary_key`)."""
    values = scan.primary_key(table, [pk] if isinstance(pk, str) else list(pk))
    return and_(*(c == v for c, v in zip(table.primary_key.columns, values)))


def export_table(
    store: KeyStore,
    name: str,
    out: Output,
    *,
    fmt_name: str = "csv",
    columns: Iterable[str] | None = None,
    types_: dict[str, str] | None = None,
    pk: str | Sequence[str] | None = None,
    progress: bool | None = None,
) -> ExportReport:
    """Write table ``name`` decrypted to ``out`` as CSV (a header line) or JSON
    lines; ``pk``: only that row (``VALUE``, or ``NAME=VALUE`` per primary-key
    column: :func:`.scan.primary_key`)."""
    if fmt_name not in FORMATS:
        raise ConfigurationError(f"format must be one of {', '.join(FORMATS)}, got {fmt_name!r}")
    engine, types_ = store.engine, dict(types_ or {})
    with engine.connect() as conn, engine.connect() as lookups, store.tracker.use_connection(lookups):
        table = scan.reflect(conn, name)
        chosen = list(columns) if columns else [c.name for c in table.columns]
        unknown = [c for c in [*chosen, *types_] if c not in table.c]
        if unknown:
            raise ConfigurationError(f"table {name} has no column {', '.join(unknown)}")
        encrypted = [c for c in scan.encrypted_columns(conn, table) if c in chosen]
        decoders = {c: _Decoder(name, c, types_.get(c)) for c in encrypted}
        contexts = {c: fmt.context_bytes(name, c) for c in encrypted}
        report = ExportReport(name, chosen, encrypted)
        stmt = select(*(table.c[c] for c in chosen))
        if pk is not None:
            stmt = stmt.where(_pk_filter(table, pk))
        total = conn.execute(select(func.count()).select_from(stmt.subquery())).scalar_one()
        opener = scan.Opener(store, lookups)
        write = _writer(out, fmt_name, chosen)
        with progress_bar(total, f"export {name}", progress) as bar:
            for row in conn.execution_options(yield_per=1000).execute(stmt.order_by(*table.primary_key.columns)):
                values = dict(zip(chosen, row))
                for column in encrypted:
                    if values[column] is not None:
                        values[column] = _decrypted(opener, decoders[column], values[column], name, column,
                                                    contexts[column], report)  # fmt: skip
                write(values)
                report.rows += 1
                bar.update(1)
    return report


def _decrypted(
    opener: scan.Opener, decode: _Decoder, raw: Any, table: str, column: str, context: bytes, report: ExportReport
) -> Any:
    opened = opener.open(raw, table, column, context)
    if opened.kind == scan.ERASED:
        report.erased += 1
        return None
    if opened.plaintext is None:
        _raise(opened, table, column)
    assert opened.plaintext is not None
    return decode(opened.plaintext, opened.key)


def _writer(out: Output, fmt_name: str, columns: list[str]) -> Callable[[dict[str, Any]], None]:
    if fmt_name == "jsonl":

        def write_json(values: dict[str, Any]) -> None:
            out.write(json.dumps(values, ensure_ascii=False, default=_jsonable) + "\n")

        return write_json
    writer = csv.writer(out)
    writer.writerow(columns)
    return lambda values: writer.writerow([_cell(values[c]) for c in columns])
