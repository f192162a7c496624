"""EncryptedType: the column type that encrypts in the application.

A ``TypeDecorator`` over a binary column. It learns its table and column
names when the column is attached to a table (see :mod:`.naming`: it is a
``SchemaEventTarget``, as ``Enum`` is), and binds every value to them as
associated data, so a value copied to another column or table fails to
decrypt. Pin the names with ``context="table.column"`` to survive a rename.

Everything that can be decided once is decided at declaration: the codec,
the context bytes, the storage type per dialect. The per-value path is:
encode, fetch the cached key (two dict lookups), one AEAD call.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import LargeBinary
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import String, TypeDecorator, TypeEngine, to_instance

from ..envelope import format as fmt
from ..envelope.codecs import UnsupportedValue, codec_for
from ..errors import ConfigurationError, DecryptionError, EncryptionError, RowKeyRequiredError
from ..keys import table as kt
from ..keys.live import LiveKeys
from ..keys.store import KeyStore
from .livematch import Sealed
from .naming import ColumnNames
from .operators import EncryptedComparator
from .rowvalue import RowValue

__all__ = ["EncryptedType"]

_HEADER = fmt.HEADER_SLICE  # value[_HEADER] is the header: the read memo's key
_MEMO_SIZE = 16  # distinct table keys remembered per column
_monotonic = time.monotonic

SCOPES = ("table", "row")
MYSQL_VARBINARY_MAX = 3072  # InnoDB's longest index key: beyond it, LONGBLOB
UTF8_MAX_BYTES = 4
# Longest encoding of the fixed-size codecs (see envelope.codecs), so that
# deterministic (queryable, indexable) columns of these types get a bounded
# VARBINARY on MySQL/MariaDB too (times allow a UTC offset with seconds and
# microseconds: "+HH:MM:SS.ffffff").
CODEC_MAX_BYTES = {"int": 20, "uuid": 16, "uuid-str": 16, "bool": 1, "date": 10, "datetime": 42, "time": 31}


class EncryptedType(TypeDecorator[Any], ColumnNames):
    """Encrypt values of ``inner`` with a data key from ``keys``.

    ``scope="table"`` uses the table's key (AES-256-GCM, random nonce);
    ``scope="row"`` a key per row. ``deterministic=True`` uses AES-SIV so
    that equal values give equal ciphertexts within the column, which
    makes ``==`` queries work and reveals equality. ``keys`` may be omitted
    where only DDL is needed (Alembic migrations).
    """

    impl = LargeBinary
    cache_ok = True
    comparator_factory = EncryptedComparator  # querying: see .operators and .guard

    def __init__(
        self,
        inner: TypeEngine[Any] | type[TypeEngine[Any]],
        keys: Any = None,
        *,
        scope: str = "table",
        deterministic: bool = False,
        context: str | None = None,
    ) -> None:
        super().__init__()
        self.inner = to_instance(inner)
        self.keys = keys
        self.scope = scope
        self.deterministic = deterministic
        self._validate()
        # row scope: the manager's row keys (installs the ORM hooks and read prefetch once)
        self._row_keys: Any = keys.rows if scope == kt.SCOPE_ROW and keys is not None else None
        # the store's lookups, reached directly: the per-value path skips the facade
        self._store: KeyStore | None = keys.store if keys is not None else None
        # deterministic columns: the write key and the keys queries match follow rotations (keys.live)
        self._live: LiveKeys | None = keys.live if keys is not None and deterministic else None
        try:
            self._codec = codec_for(self.inner)
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None
        self._read_memo: dict[bytes, tuple[Any, Any]] = {}
        # chosen once: which table-level key a value uses, and how it is sealed
        self._key_scope = kt.SCOPE_DETERMINISTIC if deterministic else kt.SCOPE_TABLE
        self._seal = fmt.seal_function(deterministic)
        self._init_names(context)

    def _validate(self) -> None:
        if self.scope not in SCOPES:
            raise ConfigurationError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "row" and self.deterministic:
            raise ConfigurationError(
                "scope='row' cannot be deterministic: equal values under different "
                "row keys never compare equal; use scope='table' for queryable columns"
            )

    # -- storage -----------------------------------------------------------------------

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """BYTEA on PostgreSQL, VARBINARY or LONGBLOB on MySQL, BLOB elsewhere."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        if dialect.name in ("mysql", "mariadb"):
            limit = self.max_stored_length()
            if limit is not None and limit <= MYSQL_VARBINARY_MAX:
                return dialect.type_descriptor(mysql.VARBINARY(limit))
            return dialect.type_descriptor(mysql.LONGBLOB())
        return dialect.type_descriptor(LargeBinary())

    def max_stored_length(self) -> int | None:
        """Largest stored value in bytes, where the inner type bounds it.

        The envelope adds the mode's overhead (``fmt.SIV_OVERHEAD`` for
        deterministic columns, ``fmt.GCM_OVERHEAD`` otherwise).
        """
        overhead = fmt.SIV_OVERHEAD if self.deterministic else fmt.GCM_OVERHEAD
        length: int | None = getattr(self.inner, "length", None)
        if isinstance(self.inner, String) and length:
            return length * UTF8_MAX_BYTES + overhead
        fixed = CODEC_MAX_BYTES.get(self._codec.name) if self.deterministic else None
        return fixed + overhead if fixed is not None else None

    def copy(self, **kw: Any) -> EncryptedType:
        """A copy keeps the names (SQLAlchemy's per-dialect copies need them);
        a copy given to a new column re-learns them when that column attaches."""
        clone = super().copy(**kw)
        clone._parent = None
        return clone

    @property
    def _static_cache_key(self) -> Any:
        """The compiled cache's key for this type: everything that changes the
        bytes. SQLAlchemy's default reads only positional constructor
        arguments, so two columns of one inner type (or a randomised and a
        deterministic one) would share a cached bind processor, and a
        statement whose SQL does not name the column (a typed bindparam,
        ``type_coerce``, ``table()``/``column()``) would seal one column's
        values under the other's context. Not memoised: the names are
        learnt when the column is attached."""
        return (
            EncryptedType,
            self.inner._static_cache_key,
            self.keys,
            self.scope,
            self.deterministic,
            self._table,
            self._column,
        )

    @property
    def python_type(self) -> type:
        return self.inner.python_type

    def coerce_compared_value(self, op: Any, value: Any) -> TypeEngine[Any]:
        """Compare with values of this same type, so they get encrypted."""
        return self

    # -- the per-value path --------------------------------------------------------------

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        return None if value is None else self.encrypt(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.decrypt(value)

    def bind_processor(self, dialect: Dialect) -> Any:
        """One closure per dialect: the per-value path skips a call layer.
        On failure the closure's frame drops the value before the error
        leaves it (frame locals are what error trackers capture)."""
        encrypt = self.encrypt
        impl: Any = self.impl_instance.bind_processor(dialect)

        def process(value: Any) -> Any:
            if value is None:
                return None
            try:
                return encrypt(value)
            except BaseException:
                value = None
                raise

        def process_impl(value: Any) -> Any:  # the storage type's own processor after ours
            if value is None:
                return None
            try:
                return impl(encrypt(value))
            except BaseException:
                value = None
                raise

        return process if impl is None else process_impl  # chosen once, not per value

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """One closure per dialect: the per-value path skips a call layer."""
        decrypt = self.decrypt
        impl = self.impl_instance.result_processor(dialect, coltype)
        if impl is None:
            return lambda value: None if value is None else decrypt(value)

        def process(value: Any) -> Any:
            value = impl(value)
            return None if value is None else decrypt(value)

        return process

    def encrypt(self, value: Any) -> bytes:
        """Serialise and seal one value for this column.

        A failure to encode or seal becomes :class:`EncryptionError`, raised
        outside the ``except`` block (no ``__context__``) once this frame's
        locals no longer hold the value: error trackers that capture frame
        locals (Sentry) see no plaintext. The write key is fetched first: its
        own errors (``KeyProviderError``, a database error) reach the caller
        as themselves, from a frame that no longer holds the value either.
        """
        table, store = self._table, self._store
        if table is None or store is None:
            raise self._unbound(EncryptionError)
        key = None
        if self.scope == kt.SCOPE_ROW:  # the row's key travels with the value
            if type(value) is not RowValue:
                value = None
                raise RowKeyRequiredError(table=table, column=self._column)
            key, value = value.key, value.value
        elif type(value) is Sealed:  # a query value, one per live key (livematch)
            key, value = value.key, value.value
        if key is None:
            live = self._live
            try:  # its errors (provider, database) reach the caller as themselves
                key = live.write_key(table, self._key_scope) if live else store.encryption_key(table, self._key_scope)
            except BaseException:
                value = None
                raise
        data: Any = None
        try:
            data = self._codec.encode(value)
            return self._seal(key.cipher, key.head, data, self._ctx)
        except UnsupportedValue as exc:
            reason = str(exc)
        except Exception:  # a codec or cipher failure: its message may quote the value
            reason = f"the value does not encode as {self._codec.name}"
        value = data = None
        raise EncryptionError(reason, table=table, column=self._column)

    def live_keys(self) -> tuple[Any, ...]:
        """The keys an equality query on this column matches (livematch)."""
        if self._live is None or self._table is None:
            raise self._unbound(EncryptionError)
        return self._live.keys(self._table, self._key_scope)

    def check_value(self, value: Any) -> str | None:
        """Why ``value`` cannot be stored in this column, or ``None`` if it can.

        The ORM runs this in ``before_flush`` (:mod:`.flushcheck`), before
        SQLAlchemy builds the statement's parameters: a refusal there is
        raised from frames that hold no other column's plaintext. The
        reason names the type, never the value.
        """
        if type(value) is RowValue:
            value = value.value
        try:
            self._codec.encode(value)
        except UnsupportedValue as exc:
            return str(exc)
        except Exception:
            return f"the value does not encode as {self._codec.name}"
        finally:
            value = None
        return None

    def literal_processor(self, dialect: Dialect) -> Any:
        """Refuse to render an encrypted column's value into SQL text.

        ``compile(compile_kwargs={"literal_binds": True})`` would otherwise
        print the plaintext (or SQLAlchemy's ``CompileError`` would quote
        it). Raised here, where SQLAlchemy asks for the processor, no value
        is in sight.
        """
        raise EncryptionError(
            "an encrypted value cannot be rendered as a SQL literal (literal_binds); compile with bound parameters",
            table=self._table,
            column=self._column,
        )

    def decrypt(self, value: bytes) -> Any:
        """Open and deserialise one stored value of this column.

        The fast path: a per-column memo from the 9 header bytes to the
        cached key and an opener with the associated data precomputed,
        valid while the cache keeps the key alive and fresh. It skips
        the header parse and the cache lookup, which cost as much as the
        AES-GCM call itself. Any failure takes the full path, which raises.
        """
        try:
            memo = self._read_memo.get(value[_HEADER])
        except TypeError:  # an unhashable bytes-like value (bytearray): the full path copies it
            memo = None
        if memo is not None:
            entry, open_value = memo
            if entry.alive and entry.expires > _monotonic():
                try:
                    return self._codec.decode(open_value(value))
                except Exception:
                    pass
        return self._decrypt_full(value)

    def _decrypt_full(self, value: bytes) -> Any:
        """Parse the header, find the key, open the value, fill the memo.

        Takes any bytes-like value (psycopg returns raw ``BYTEA`` as a
        ``memoryview``): the fast path reads those as they are."""
        value = bytes(value)
        table, column, store = self._table, self._column, self._store
        if table is None or store is None:
            raise self._unbound(DecryptionError)
        try:
            version, key_id = fmt.read_header(value)
        except fmt.InvalidEnvelope as exc:
            raise DecryptionError(str(exc), table=table, column=column) from None
        if self.scope == kt.SCOPE_ROW:
            key = self._row_keys.decryption_key(key_id, table=table, column=column)
            if key is None:  # the row's key was shredded: erased on purpose
                return None
        else:
            key = store.decryption_key(key_id, table=table, column=column or "")
        data = None
        try:
            if version != key.head[0]:
                raise fmt.InvalidEnvelope("format version does not match the key's algorithm")
            data = fmt.open_value(key.cipher, version, value, self._ctx)
            self._remember(key, version, value[_HEADER])
            return self._codec.decode(data)
        except fmt.InvalidEnvelope as exc:
            reason = str(exc)
        except Exception:  # authentic bytes that do not decode: a codec change
            reason = f"stored bytes do not decode as {self._codec.name}"
        data = None  # the opened plaintext must not sit in the traceback's frame
        raise DecryptionError(reason, table=table, column=column, key_id=fmt.format_key_id(key_id))

    def _remember(self, key: Any, version: int, head: bytes) -> None:
        """Memo a table-level key for this column (row keys are one per row:
        memoising them would only churn)."""
        if self.scope == kt.SCOPE_ROW or len(self._read_memo) >= _MEMO_SIZE:
            return
        # registered with the cache entry: the memo (which holds the cipher)
        # is dropped when the entry is evicted, expires or the cache is cleared
        key.remember(self._read_memo, head, (key, fmt.opener(key.cipher, version, head, self._ctx)))

    def _bind_names(self, table: str, column: str) -> None:
        super()._bind_names(table, column)
        self._read_memo = {}  # the associated data depends on the names

    def _unbound(self, error: type[EncryptionError] | type[DecryptionError]) -> Exception:
        if self.keys is None:
            return error(
                "this EncryptedType has no KeyManager (declared for DDL only)", table=self._table, column=self._column
            )
        return error("the column is not attached to a table and has no context=")

    def __repr__(self) -> str:
        args = [repr(self.inner)]
        if self.scope != "table":
            args.append(f"scope={self.scope!r}")
        if self.deterministic:
            args.append("deterministic=True")
        if self.context is not None:
            args.append(f"context={self.context!r}")
        return f"EncryptedType({', '.join(args)})"
