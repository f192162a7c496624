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
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine, to_instance

from ..envelope import format as fmt
from ..envelope.codecs import UnsupportedValue, codec_for
from ..errors import ConfigurationError, DecryptionError, EncryptionError, RowKeyRequiredError
from ..keys import table as kt
from ..keys.clock import CLOCK
from ..keys.store import KeyStore
from . import binds, fastpath, migrating, storage
from .merged import merged_expression
from .livematch import Sealed
from .naming import ColumnNames
from .operators import EncryptedComparator
from .rowvalue import RowValue

__all__ = ["EncryptedType"]

_HEADER = fmt.HEADER_SLICE  # value[_HEADER] is the header: the read memo's key
_MEMO_SIZE = 16  # distinct table keys remembered per column
_monotonic = time.monotonic

SCOPES = ("table", "row")


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
        migrating_from: str | None = None,
        migrating_to: str | None = None,
    ) -> None:
        super().__init__()
        self.migrating_from, self.migrating_to = migrating_from, migrating_to
        self.inner = to_instance(inner)
        self.keys = keys
        self.scope = scope
        self.deterministic = deterministic
        self._validate()
        if scope == kt.SCOPE_ROW and keys is not None:
            keys.use_row_scope()  # row keys, ORM hooks and read prefetch, once per manager
        try:
            self._codec = codec_for(self.inner)
        except TypeError as exc:
            raise ConfigurationError(str(exc)) from None
        self._vias: dict[Any, binds.Via] = {}  # per bound engine: its store, row keys, read memo
        # chosen once: which table-level key a value uses, and how it is sealed
        self._key_scope = kt.SCOPE_DETERMINISTIC if deterministic else kt.SCOPE_TABLE
        self._seal = fmt.seal_function(deterministic)
        self._init_names(context)

    def _validate(self) -> None:
        if self.migrating_from is not None or self.migrating_to is not None:
            migrating.check_declaration(self.migrating_from, self.migrating_to)
        if self.scope not in SCOPES:
            raise ConfigurationError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "row" and self.deterministic:
            raise ConfigurationError(
                "scope='row' cannot be deterministic: equal values under different "
                "row keys never compare equal; use scope='table' for queryable columns"
            )

    # -- storage -----------------------------------------------------------------------

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        """BYTEA on PostgreSQL, VARBINARY or LONGBLOB on MySQL, BLOB elsewhere (:mod:`.storage`)."""
        return storage.dialect_impl(dialect, self.max_stored_length())

    def max_stored_length(self) -> int | None:
        """Largest stored value in bytes, where the inner type bounds it (:mod:`.storage`)."""
        return storage.max_stored_length(self.inner, self._codec.name, self.deterministic)

    def _restored(self) -> None:
        """Unpickled or deep-copied (:mod:`.portable`): the codec is chosen again."""
        self._codec = codec_for(self.inner)

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
        inner = self.inner
        return (
            EncryptedType,
            inner._static_cache_key if getattr(inner, "cache_ok", True) else inner,  # no warning, no sharing
            self.keys,
            self.scope,
            self.deterministic,
            self._table,
            self._column,
            self.migrating_from,
            self.migrating_to,
        )

    @property
    def python_type(self) -> type:
        return self.inner.python_type

    def column_expression(self, colexpr: Any) -> Any:
        """A migrating column is read merged with its twin (:mod:`.merged`):
        the value the ORM shows, in Core SELECTs and RETURNING too."""
        if self.migrating_from is not None:
            return merged_expression(colexpr.type, colexpr, self.migrating_from, encrypting=True)
        if self.migrating_to is not None:
            return merged_expression(colexpr.type, colexpr, self.migrating_to, encrypting=False)
        return colexpr

    def coerce_compared_value(self, op: Any, value: Any) -> TypeEngine[Any]:
        """Compare with values of this same type, so they get encrypted."""
        return self

    # -- the per-value path --------------------------------------------------------------

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        return None if value is None else self.encrypt(value, binds.require(self, dialect).store)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.decrypt(value, binds.require(self, dialect))

    def bind_processor(self, dialect: Dialect) -> Any:
        """One closure per dialect (:mod:`.fastpath`), sealing under the store
        of the dialect's engine (keys.engines): the write key leased once per
        statement, the storage type's own processor after ours."""
        impl: Any = storage.bytes_processor(dialect, self.impl_instance.bind_processor(dialect))
        via = binds.via(self, dialect)
        if via is None:  # not bound (yet): found per value, so a later bind() serves it
            return binds.late_bind_processor(self, dialect, impl)
        return fastpath.bind_closure(self, impl, via)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """One closure per dialect (:mod:`.fastpath`), opening with the keys
        of the dialect's engine: the read memo, or the row-key cache, before
        the full :meth:`decrypt`."""
        impl = self.impl_instance.result_processor(dialect, coltype)
        via = binds.via(self, dialect)
        if via is None:  # not bound (yet): values refused until it is
            return binds.late_result_processor(self, dialect, impl)
        return fastpath.result_closure(self, impl, via)

    def encrypt(self, value: Any, store: KeyStore | None = None) -> bytes:
        """Serialise and seal one value for this column, under a key of
        ``store`` (the processors pass their engine's; a direct call without
        it uses the manager's one bound engine).

        A failure to encode or seal becomes :class:`EncryptionError`, raised
        outside the ``except`` block (no ``__context__``) once this frame's
        locals no longer hold the value: error trackers that capture frame
        locals (Sentry) see no plaintext. The write key is fetched first: its
        own errors (``KeyProviderError``, a database error) reach the caller
        as themselves, from a frame that no longer holds the value either.
        """
        table = self._table
        if table is None or store is None:
            try:
                store = self._direct(EncryptionError).store  # raises where no table or engine
            except BaseException:
                value = None
                raise
            table = str(self._table)
        key = None
        if self.scope == kt.SCOPE_ROW:  # the row's key travels with the value
            if type(value) is not RowValue:
                value = None
                raise RowKeyRequiredError(table=table, column=self._column)
            key, value = value.key, value.value
        elif type(value) is Sealed:  # a query value, one per live key (livematch)
            key, value = value.key, value.value
        if key is None:
            try:  # its errors (provider, database) reach the caller as themselves
                if self.deterministic:  # the write key follows rotations (keys.live)
                    key = self.keys.live_for(store).write_key(table, self._key_scope)
                else:
                    key = store.encryption_key(table, self._key_scope)
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
        """The keys an equality query on this column matches (livematch), in
        the database of the statement being executed."""
        if self.keys is None or self._table is None or not self.deterministic:
            raise self._unbound(EncryptionError)
        return tuple(self.keys.live_for(None).keys(self._table, self._key_scope))

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

    def decrypt(self, value: bytes, via: binds.Via | None = None) -> Any:
        """Open and deserialise one stored value of this column, with the
        keys of ``via``'s engine (the processors pass theirs; a direct call
        without it uses the manager's one bound engine).

        The fast path: a per-column memo from the 9 header bytes to the
        cached key and an opener with the associated data precomputed,
        valid while the cache keeps the key alive and fresh. It skips
        the header parse and the cache lookup, which cost as much as the
        AES-GCM call itself. Any failure takes the full path, which raises.
        """
        if via is None:
            via = self._direct(DecryptionError)
        try:
            memo = via.memo.get(value[_HEADER])
        except TypeError:  # an unhashable bytes-like value (bytearray): the full path copies it
            memo = None
        if memo is not None:
            open_value, entry = memo[0], memo[2]
            if entry.alive and entry.expires > _monotonic():
                try:
                    return open_value(value)  # opens and decodes
                except Exception:
                    pass
        return self._decrypt_full(value, via)

    def _decrypt_full(self, value: bytes, via: binds.Via) -> Any:
        """Parse the header, find the key, open the value, fill the memo.

        Takes any bytes-like value (psycopg returns raw ``BYTEA`` as a
        ``memoryview``): the fast path reads those as they are."""
        value = bytes(value)
        table, column = self._table, self._column
        if table is None:
            raise self._unbound(DecryptionError)
        try:
            version, key_id = fmt.read_header(value)
        except fmt.InvalidEnvelope as exc:
            raise DecryptionError(str(exc), table=table, column=column) from None
        if self.scope == kt.SCOPE_ROW:
            key = via.binding.rows.decryption_key(key_id, table=table, column=column)
            if key is None:  # the row's key was shredded: erased on purpose
                return None
        else:
            key = via.store.decryption_key(key_id, table=table, column=column or "")
        data = None
        try:
            if version != key.head[0]:
                raise fmt.InvalidEnvelope("format version does not match the key's algorithm")
            data = fmt.open_value(key.cipher, version, value, self._ctx)
            self._remember(via.memo, key, version, value[_HEADER])
            return self._codec.decode(data)
        except fmt.InvalidEnvelope as exc:
            reason = str(exc)
        except Exception:  # authentic bytes that do not decode: a codec change
            reason = f"stored bytes do not decode as {self._codec.name}"
        data = None  # the opened plaintext must not sit in the traceback's frame
        raise DecryptionError(reason, table=table, column=column, key_id=fmt.format_key_id(key_id))

    def _remember(self, memo: dict[bytes, Any], key: Any, version: int, head: bytes) -> None:
        """Memo a table-level key for this column (row keys are one per row:
        memoising them would only churn)."""
        if self.scope == kt.SCOPE_ROW or len(memo) >= _MEMO_SIZE:
            return
        # registered with the cache entry: the memo (which holds the cipher)
        # is dropped when the entry is evicted, expires or the cache is cleared
        # [opener, the statement epoch it was last checked in, key, and the
        # opener's parts for .fastpath to call inline: the cipher's decrypt,
        # its associated data (as that cipher takes it), AES-SIV or not]
        opener = fmt.opener(key.cipher, version, head, self._ctx, then=self._codec.decode)
        aad, siv_aad = fmt.associated_data(version, head, self._ctx)
        parts = (key.cipher.decrypt, aad, False) if siv_aad is None else (key.cipher.decrypt, siv_aad, True)
        key.remember(memo, head, [opener, CLOCK.epoch, key, *parts])

    def _on_table_attach(self, column: Any, table: Any) -> None:
        """A migrating column registers its pair; an encrypted shadow
        (``migrating_from``) binds its values to the name it will have once
        the plaintext twin is dropped (docs/migrations.md)."""
        if self.migrating_from is not None:
            migrating.register(table, column.name, self.migrating_from, migrating.ENCRYPTING)
            if self.context is None:
                self._bind_names(table.fullname, self.migrating_from)
                return
        elif self.migrating_to is not None:
            migrating.register(table, column.name, self.migrating_to, migrating.DECRYPTING)
        super()._on_table_attach(column, table)

    def _bind_names(self, table: str, column: str) -> None:
        super()._bind_names(table, column)
        self._vias = {}  # read memos: the associated data depends on the names

    def _direct(self, error: type[EncryptionError] | type[DecryptionError]) -> binds.Via:
        """A direct encrypt()/decrypt() call's engine: the manager's only one."""
        if self.keys is None or self._table is None:
            raise self._unbound(error)
        via = binds.via(self, self.keys.engines.select().engine.dialect)
        assert via is not None
        return via

    def _unbound(self, error: type[EncryptionError] | type[DecryptionError]) -> Exception:
        unpickled = self.missing_keys((self._table, self._column))
        if unpickled is not None:
            return unpickled
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
        for name in ("migrating_from", "migrating_to"):
            if getattr(self, name) is not None:
                args.append(f"{name}={getattr(self, name)!r}")
        return f"EncryptedType({', '.join(args)})"
