"""``sa-envelope verify --index``: search-index tokens checked from the command line.

A search index's settings (kind, bits, n, prefix length, granularities,
normaliser) live in the application's code, not in the database, and the
CLI runs no application code; so each index to check is described as the
model declares it::

    --index patients.name=prefix:max_length=8,normalizer=text_folded
    --index patients.notes=substring:n=3,bits=32
    --index patients.born=range:granularities=year/month/day,type=date

Options: ``bits``, ``context`` (the model's pinned ``context=``),
``normalizer`` (a built-in: ``email``, ``email_folded``, ``phone``,
``text_folded``), ``max_length`` (prefix), ``n`` (substring),
``granularities`` (range: calendar names or bucket widths, coarsest first,
separated by ``/``), ``type`` (the column's inner type, default ``string``,
or ``date`` for a range) and ``deterministic=yes``. The table is reflected
and each described index checked by :func:`sa_envelope.search.verify.verify_index`,
in the row's own token array where the table has the index's array column
(PostgreSQL, :mod:`sa_envelope.search.arrays`), else in the token table.
The indexes that no ``--index`` describes are listed as not checked: those
the token table holds, and on PostgreSQL the token arrays the database has
(``BIGINT[]`` columns named as :func:`sa_envelope.search.arrays.column_name`
names them), each with its table and column.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Callable

from sqlalchemy import Column, Date, DateTime, Engine, Integer, MetaData, Numeric, String, Table, inspect, select
from sqlalchemy import BigInteger, LargeBinary, Text
from sqlalchemy.types import _Binary
from sqlalchemy.dialects.postgresql import ARRAY

from ..columns import normalizers
from ..columns.blindindex import BlindIndexType
from ..columns.encrypted import EncryptedType
from ..errors import ConfigurationError
from ..manager import KeyManager
from ..search import arrays
from ..search.indexes import PrefixIndex, SearchIndex, SubstringIndex
from ..search.ranges import RangeIndex
from ..jobs.scan import encrypted_columns
from ..columns.searchable import indexes_of
from ..search.verify import IndexReport, verify_index

__all__ = [
    "BLIND",
    "SPEC_HELP",
    "check_indexes",
    "declared_table",
    "parse_specs",
    "reindexed_columns",
    "unchecked_indexes",
]

SPEC_HELP = "TABLE.COLUMN=KIND[:OPTION=VALUE,...]"
KINDS: dict[str, type[SearchIndex]] = {"prefix": PrefixIndex, "substring": SubstringIndex, "range": RangeIndex}
BLIND = "blind"  # a BlindIndexType column: TABLE.INDEX_COLUMN=blind:source=COLUMN[,bits=..,normalizer=..]
TYPES: dict[str, Callable[[], Any]] = {
    "string": String,
    "text": Text,
    "int": Integer,
    "bigint": BigInteger,
    "numeric": Numeric,
    "date": Date,
    "datetime": DateTime,
}
NORMALIZERS: dict[str, Callable[[str], str]] = {
    "email": normalizers.normalize_email,
    "email_folded": normalizers.normalize_email_folded,
    "phone": normalizers.normalize_phone,
    "text_folded": normalizers.normalize_text_folded,
}
_INTS = ("bits", "max_length", "n")


class _Spec:
    """One ``--index`` argument, parsed."""

    def __init__(self, text: str) -> None:
        target, sep, rest = text.partition("=")
        self.table, dot, self.column = target.rpartition(".")
        kind, _, options = rest.partition(":")
        if not (sep and dot and self.table and self.column) or (kind not in KINDS and kind != BLIND):
            raise ConfigurationError(f"--index {text!r}: give {SPEC_HELP}, KIND one of {', '.join(KINDS)}, {BLIND}")
        self.kind = kind
        self.options: dict[str, str] = {}
        for pair in filter(None, options.split(",")):
            name, eq, value = pair.partition("=")
            if not eq:
                raise ConfigurationError(f"--index {text!r}: option {pair!r} is not OPTION=VALUE")
            self.options[name.strip()] = value.strip()

    @property
    def tokens_column(self) -> str:
        """Its token column's name, were its storage an array (:mod:`..search.arrays`)."""
        pinned = self.options.get("context", "").rpartition(".")[2]
        return arrays.column_name(pinned or self.column, self.kind)

    @property
    def source(self) -> str:
        """The column whose values are indexed (a blind index names it with ``source=``)."""
        return self.options.get("source", "") if self.kind == BLIND else self.column

    def blind_type(self, keys: KeyManager | None) -> BlindIndexType:
        """The ``BlindIndexType`` a ``blind`` spec describes."""
        where = f"--index {self.table}.{self.column}"
        unknown = set(self.options) - {"source", "bits", "normalizer", "context", "type", "deterministic"}
        if unknown or not self.source:
            raise ConfigurationError(f"{where}: a blind index takes source=COLUMN (required), bits, normalizer, "
                                     "context, and the source's type and deterministic")  # fmt: skip
        try:
            bits = int(self.options.get("bits", "32"))
        except ValueError:
            raise ConfigurationError(f"{where}: bits takes a whole number") from None
        normalizer = (
            _choice(NORMALIZERS, self.options["normalizer"], "normalizer") if "normalizer" in self.options else None
        )
        return BlindIndexType(self.source, keys, normalizer=normalizer, bits=bits, context=self.options.get("context"))

    def index(self, keys: KeyManager | None, storage: str = "table") -> SearchIndex:
        where = f"--index {self.table}.{self.column}"
        try:
            args: dict[str, Any] = {k: int(v) for k, v in self.options.items() if k in _INTS}
        except ValueError:
            raise ConfigurationError(f"{where}: {', '.join(_INTS)} take whole numbers") from None
        if "context" in self.options:
            args["context"] = self.options["context"]
        if "normalizer" in self.options:
            args["normalizer"] = _choice(NORMALIZERS, self.options["normalizer"], "normalizer")
        if "granularities" in self.options:
            args["granularities"] = [_level(g) for g in self.options["granularities"].split("/")]
        unknown = set(self.options) - set(_INTS) - {"context", "normalizer", "granularities", "type", "deterministic"}
        if unknown:
            raise ConfigurationError(f"{where}: no option {', '.join(sorted(unknown))}")
        try:
            return KINDS[self.kind](self.column, keys, storage=storage, **args)
        except TypeError:  # an option of another kind
            raise ConfigurationError(f"{where}: a {self.kind} index takes no {', '.join(sorted(args))}") from None

    def column_type(self, keys: KeyManager | None) -> EncryptedType:
        """The type of the indexed (source) column, as the options describe it."""
        default = "date" if self.kind == "range" else "string"
        inner = _choice(TYPES, self.options.get("type", default), "type")()
        deterministic = self.options.get("deterministic", "no").lower() in ("yes", "true", "1")
        pinned = self.options.get("context") if self.kind != BLIND else None  # a blind index's pins the index
        return EncryptedType(inner, keys, deterministic=deterministic, context=pinned or f"{self.table}.{self.source}")


def _choice(options: dict[str, Any], name: str, what: str) -> Any:
    if name not in options:
        raise ConfigurationError(f"--index: {what} {name!r} is not one of {', '.join(options)}")
    return options[name]


def _level(text: str) -> Any:
    """A calendar granularity name, or a bucket width (an integer or a decimal)."""
    return text if text.isalpha() else (int(text) if text.isdigit() else Decimal(text))


def declared_table(engine: Engine, keys: KeyManager, name: str, specs: list[_Spec]) -> Table:
    """The reflected table, its indexed columns encrypted, its indexes
    attached: in array storage where the table has the index's token column
    (which the index then declares), else in the token table; a ``blind``
    spec's column declared ``BlindIndexType``."""
    reflected = Table(name, MetaData(), autoload_with=engine)
    typed: dict[str, Any] = {s.source: s.column_type(keys) for s in specs}
    typed |= {s.column: s.blind_type(keys) for s in specs if s.kind == BLIND}
    for spec in specs:
        for column in {spec.column, spec.source}:
            if column not in reflected.c:
                raise ConfigurationError(f"--index: table {name} has no column {column}")
    searched = [s for s in specs if s.kind != BLIND]
    in_arrays = {s.tokens_column for s in searched if s.tokens_column in reflected.c}
    columns = [
        Column(c.name, typed.get(c.name, c.type), primary_key=c.primary_key)
        for c in reflected.columns
        if c.name not in in_arrays
    ]
    indexes = [s.index(keys, "array" if s.tokens_column in in_arrays else "table") for s in searched]
    return Table(name, MetaData(), *columns, *indexes)


def parse_specs(texts: list[str], *, blind: bool = False) -> list[_Spec]:
    """The ``--index`` arguments, each checked now (before any database work);
    ``blind``: whether ``blind`` specs are taken (``reencrypt``; ``verify``
    checks search indexes only)."""
    specs = [_Spec(t) for t in texts]
    for spec in specs:
        if spec.kind == BLIND and not blind:
            raise ConfigurationError(f"--index {spec.table}.{spec.column}: verify checks search indexes "
                                     f"({', '.join(KINDS)}), not blind indexes")  # fmt: skip
        (spec.blind_type if spec.kind == BLIND else spec.index)(None)
        spec.column_type(None)
    return specs


def check_indexes(keys: KeyManager, engine: Engine, specs: list[_Spec]) -> list[IndexReport]:
    """Check every index ``specs`` describe."""
    by_table: dict[str, list[_Spec]] = {}
    for spec in specs:
        by_table.setdefault(spec.table, []).append(spec)
    reports: list[IndexReport] = []
    for name, specs in by_table.items():
        reports.extend(verify_index(engine, declared_table(engine, keys, name, specs)))
    return reports


def unchecked_indexes(
    keys: KeyManager, engine: Engine, checked: list[IndexReport]
) -> list[tuple[str, str, str | None]]:
    """(table, index, token array column or None) of the indexes in the
    database that were not checked: in the token table, or in token arrays."""
    done = {(r.table, r.index) for r in checked}
    return sorted((f for f in _held(keys, engine) if f[:2] not in done), key=lambda f: (f[0], f[1], f[2] or ""))


def _held(keys: KeyManager, engine: Engine) -> set[tuple[str, str, str | None]]:
    """Every search index the database holds tokens of: (table, index, token array column or None)."""
    found: set[tuple[str, str, str | None]] = set(_token_arrays(engine))
    if inspect(engine).has_table(keys.search_table.name):
        tokens = keys.search_table
        with engine.connect() as conn:
            held = conn.execute(select(tokens.c.owner, tokens.c.name).distinct()).all()
        found |= {(str(o), str(n), None) for o, n in held}
    return found


def reindexed_columns(
    keys: KeyManager, engine: Engine, table: str, key: str, specs: list[_Spec], not_indexed: list[str]
) -> list[Column[Any]]:
    """What ``reencrypt`` moves off ``table``'s blind-index ``key``: the
    ``blind`` specs' columns (or, without any, a search index's source:
    the job rebuilds every search index of the table), declared from the
    specs. Refused while the table has an index no spec describes: the job
    retires the key, and that index's entries would stay under it, missed
    by every lookup. A binary column that is not an envelope may be a blind
    index: it must be described, or named in ``not_indexed``."""
    where = f"key {key} is the blind-index key of {table}"
    strays = sorted({s.table for s in specs} - {table})
    if strays:
        raise ConfigurationError(f"--index: {where}, not of {', '.join(strays)}")
    declared = declared_table(engine, keys, table, specs)
    described = {(i.owner, i.name) for i in indexes_of(declared)}
    missing = [
        f"search index {n}"
        for t, n, _ in sorted(_held(keys, engine), key=str)
        if t == table and (t, n) not in described
    ]
    with engine.connect() as conn:
        envelopes = set(encrypted_columns(conn, declared))
        for column in declared.columns:
            plain = isinstance(column.type, (_Binary, LargeBinary)) and not isinstance(column.type, BlindIndexType)
            if plain and column.name not in envelopes | set(not_indexed) and _has_values(conn, column):
                missing.append(f"binary column {column.name} (a blind index? else --not-indexed {column.name})")
    if missing:
        raise ConfigurationError(f"{where}: describe every index that uses it with --index ({SPEC_HELP}, "
                                 f"or {BLIND}:source=COLUMN); not described: {'; '.join(missing)}")  # fmt: skip
    blind = [declared.c[s.column] for s in specs if s.kind == BLIND]
    searched = [declared.c[s.source] for s in specs if s.kind != BLIND]
    return blind or searched[:1]


def _has_values(conn: Any, column: Column[Any]) -> bool:
    return conn.execute(select(column).where(column.is_not(None)).limit(1)).first() is not None


def _token_arrays(engine: Engine) -> list[tuple[str, str, str]]:
    """(table, index, column) of every token array column in the database
    (PostgreSQL; an array's tokens are in its row, so the token table never lists them)."""
    if engine.dialect.name not in arrays.ARRAY_DIALECTS:
        return []
    found, inspector = [], inspect(engine)
    for table in inspector.get_table_names():
        for column in inspector.get_columns(table):
            if not isinstance(column["type"], ARRAY):
                continue
            for kind in KINDS:
                source = column["name"].removesuffix(arrays.column_name("", kind))
                if source and source != column["name"]:
                    found.append((table, f"{source}/{kind}", column["name"]))
    return found
