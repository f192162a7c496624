"""Blind indexes: find rows by a normalised value without a deterministic cipher.

A blind index is a companion column holding a keyed HMAC-SHA256 of a
*normalised* value of another column, truncated to a chosen number of bits::

    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(EncryptedType(String(200), keys))
        email_index: Mapped[bytes | None] = mapped_column(
            BlindIndexType("email", keys, normalizer=normalize_email, bits=32), index=True
        )

    lookup(session, User.email, "Ada@Example.com")          # exact matches only
    select(User).where(User.email_index.matches("ADA@example.com"))  # candidates

The ORM keeps the index in step: on insert, and on update when the source
attribute changed, it computes the HMAC in the flush, on the flush's
connection (so a new index key is stored in the same transaction as the
first row that uses it, like table keys). ``matches()`` filters on the
index; because a truncated HMAC collides by design, it returns
*candidates*. :func:`lookup` re-checks each candidate against its decrypted,
normalised source value, so false positives never reach the caller.

The key: one key per table of scope ``"blind-index"`` in the key table,
wrapped by the provider like a table key; each index column uses its own
subkey, HMAC(table key, context of table and index column), so two indexes
over the same value do not match each other (``envelope.ciphers.HmacKey``).
The normalisers are in :mod:`.normalizers`.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import LargeBinary, event, select
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapper, Session, attributes
from sqlalchemy.types import TypeDecorator, TypeEngine

from ..errors import ConfigurationError, EncryptionError, UnsupportedQueryError
from ..keys import table as kt
from .livematch import Sealed, expanding
from .naming import ColumnNames
from .searchable import index_for

__all__ = ["BlindIndexType", "check_index_writes", "lookup"]


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


# -- the column type -------------------------------------------------------------------


class BlindIndexType(TypeDecorator[bytes], ColumnNames):
    """A keyed, truncated HMAC of the normalised value of attribute ``source``.

    ``normalizer`` maps a source value to the str or bytes that is indexed
    (default: ``str``); values equal after normalising share an index
    value. ``bits`` (a multiple of 8, 8 to 256) sets how much the index
    narrows a search: fewer bits, more false positives for :func:`lookup`
    to discard, and less for a reader of the database to learn.
    """

    impl = LargeBinary
    cache_ok = True

    def __init__(
        self,
        source: str,
        keys: Any = None,
        *,
        normalizer: Callable[[Any], Any] | None = None,
        bits: int = 32,
        context: str | None = None,
    ) -> None:
        super().__init__()
        if bits % 8 or not 8 <= bits <= 256:
            raise ConfigurationError(f"bits must be a multiple of 8 from 8 to 256, got {bits}")
        self.source = source
        self.keys = keys
        self.normalizer = normalizer
        self.bits = bits
        self._size = bits // 8
        # slot 0: (cached key entry, hmac object), dropped when the entry dies
        self._subkey: dict[int, tuple[Any, Any]] = {}
        self._init_names(context)
        _install_orm_hooks()

    # -- the column (names: _naming) --------------------------------------------------

    def copy(self, **kw: Any) -> BlindIndexType:
        clone = super().copy(**kw)
        clone._parent = None
        clone._subkey = {}
        return clone

    @property
    def _static_cache_key(self) -> Any:
        """Everything that changes the digest (see EncryptedType's): the
        source, the manager, the normaliser, the bits and the attached names."""
        return (BlindIndexType, self.source, self.keys, self.normalizer, self.bits, self._table, self._column)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(self._size))
        return dialect.type_descriptor(LargeBinary())

    # -- values ------------------------------------------------------------------------

    def normalise(self, value: Any) -> bytes:
        """The bytes that are indexed for ``value``."""
        return _as_bytes(self.normalizer(value) if self.normalizer is not None else value)

    def _keys(self, store: Any = None) -> Any:
        table, keys = self._table, self.keys
        unpickled = self.missing_keys((table, self._column))
        if unpickled is not None:
            raise unpickled
        if table is None or keys is None:
            raise EncryptionError(
                "this BlindIndexType has no KeyManager or is not attached to a table", table=table, column=self._column
            )
        return keys.live_for(store)

    def live_keys(self) -> tuple[Any, ...]:
        """The keys a lookup matches, in the database of the statement being
        executed: the write key and any being rotated (keys.live)."""
        return tuple(self._keys().keys(self._table, kt.SCOPE_BLIND_INDEX))

    def digest(self, value: Any, store: Any = None, key: Any = None) -> bytes:
        """The index value of a source value (one HMAC once the key is cached),
        under the given live ``key``, else the write key of ``store``'s
        database (default: the statement's, or the one bound engine's)."""
        live = self._keys(store)
        entry = key if key is not None else live.write_key(self._table, kt.SCOPE_BLIND_INDEX)
        cached_entry, base = self._subkey.get(entry.key_id, (None, None))
        if cached_entry is not entry:  # a new or re-loaded key: derive once
            base = entry.cipher.subkey(self._ctx)
            entry.remember(self._subkey, entry.key_id, (entry, base))
        mac = base.copy()
        mac.update(self.normalise(value))
        digest: bytes = mac.digest()
        return digest[: self._size]

    def process_bind_param(self, value: Any, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        if isinstance(value, Sealed):  # a query value under one live key (livematch)
            return self.digest(value.value, key=value.key)
        if isinstance(value, (bytes, bytearray, memoryview)) and len(value) == self._size:
            return bytes(value)  # an index value computed at flush
        raise UnsupportedQueryError(
            f"{self._table}.{self._column} holds index digests: compare it with "
            f".matches(value), or find rows with sa_envelope.lookup()",
            table=self._table,
            column=self._column,
        )

    def process_result_value(self, value: Any, dialect: Dialect) -> bytes | None:
        return bytes(value) if value is not None else None

    class comparator_factory(TypeDecorator.Comparator[bytes]):
        """Adds ``matches()`` / ``matches_any()`` to the index attribute."""

        def matches(self, value: Any) -> Any:
            """Rows whose index equals that of ``value`` under any live key:
            candidates, see lookup()."""
            return self.matches_any([value])

        def matches_any(self, values: Any) -> Any:
            """Rows whose index equals that of any of ``values`` (one digest
            per value and live key, computed when the statement runs)."""
            index_type: Any = self.expr.type
            probes = expanding(index_type, list(values), index_type.live_keys)
            return self.expr.in_(probes)

    def __repr__(self) -> str:
        return f"BlindIndexType({self.source!r}, bits={self.bits})"


# -- keeping the index in step with the ORM ----------------------------------------------

_hooks_installed = False


def _install_orm_hooks() -> None:
    """Listen for mapper configuration once, when the first index is declared."""
    global _hooks_installed
    if not _hooks_installed:
        event.listen(Mapper, "mapper_configured", _on_mapper_configured)
        _hooks_installed = True


def _indexes_of(mapper: Mapper[Any]) -> list[tuple[str, BlindIndexType]]:
    """(index attribute key, type) for every blind index column of a mapper."""
    found = []
    for prop in mapper.column_attrs:
        col_type = prop.columns[0].type
        if isinstance(col_type, BlindIndexType):
            found.append((prop.key, col_type))
    return found


def _on_mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    indexes = _indexes_of(mapper)
    if not indexes:
        return
    for _, index_type in indexes:
        if index_type.source not in mapper.attrs:
            raise ConfigurationError(
                f"blind index {index_type._table}.{index_type._column} names source "
                f"{index_type.source!r}, which {class_.__name__} does not map"
            )

    def fill(connection: Any, target: Any, changed_only: bool) -> None:
        for key, index_type in indexes:
            if changed_only and not attributes.get_history(target, index_type.source).has_changes():
                continue
            value = getattr(target, index_type.source)
            if value is None:
                setattr(target, key, None)
                continue
            keys = index_type.keys
            if keys is None:
                setattr(target, key, index_type.digest(value))
            else:  # the key of the flush's own database, in its transaction
                binding = keys.engines.of(connection)
                with binding.tracker.use_connection(connection):
                    setattr(target, key, index_type.digest(value, binding.store))
            if changed_only:  # an unchanged digest must still be in the UPDATE,
                attributes.flag_modified(target, key)  # or check_index_writes objects

    event.listen(mapper, "before_insert", lambda m, conn, target: fill(conn, target, False))
    event.listen(mapper, "before_update", lambda m, conn, target: fill(conn, target, True))


# -- statements that would leave an index stale -------------------------------------------


def _written_keys(stmt: Any, multiparams: Any, params: Any) -> set[str]:
    """Column keys an INSERT/UPDATE sets, from its values() and its parameters."""
    keys = {getattr(k, "key", k) for k in (stmt._values or ())}
    for row in stmt._multi_values[:1]:
        for values in row[:1]:
            keys.update(getattr(k, "key", k) for k in (values if isinstance(values, dict) else ()))
    first = multiparams[0] if multiparams else params
    if isinstance(first, dict):
        keys.update(first)
    return keys


def check_index_writes(stmt: Any, multiparams: Any = (), params: Any = None) -> None:
    """Refuse an INSERT/UPDATE that sets a blind index's source column but not
    the index (Core, or ORM bulk statements, which skip the flush events):
    the index would go stale and lookups would silently miss the row."""
    if not (getattr(stmt, "is_insert", False) or getattr(stmt, "is_update", False)):
        return
    table: Any = getattr(stmt, "table", None)
    columns = getattr(table, "c", ())
    indexes = [c for c in columns if isinstance(c.type, BlindIndexType)]
    if not indexes:
        return
    written = _written_keys(stmt, multiparams, params)
    for index_column in indexes:
        source = table.c.get(index_column.type.source)
        if source is not None and source.key in written and index_column.key not in written:
            raise UnsupportedQueryError(
                f"this statement writes {table.name}.{source.name} but not its blind index "
                f"{index_column.name}, which would go stale; change the row through the ORM "
                f"unit of work, or also set {index_column.key}=<type>.digest(value)",
                table=table.name,
                column=index_column.name,
            )


# -- exact lookups ---------------------------------------------------------------------


def _resolve(attribute: Any) -> tuple[Any, Any, BlindIndexType]:
    """(entity, index attribute, index type) from a source or index attribute."""
    mapper = attribute.parent.mapper
    entity = attribute.parent.entity
    column_type = attribute.property.columns[0].type
    if isinstance(column_type, BlindIndexType):
        return entity, attribute, column_type
    matches = [(k, t) for k, t in _indexes_of(mapper) if t.source == attribute.key]
    if len(matches) != 1:
        raise ConfigurationError(
            f"{mapper.class_.__name__}.{attribute.key} has {len(matches)} blind indexes; "
            "pass the index attribute itself"
        )
    key, index_type = matches[0]
    return entity, getattr(entity, key), index_type


def lookup(
    session: Session, attribute: Any, *args: Any, startswith: Any = None, contains: Any = None, between: Any = None
) -> list[Any]:
    """Objects whose ``attribute`` equals ``value`` after normalising:
    ``lookup(session, attr, value, *where)``.

    ``attribute`` is the source attribute (``User.email``) or its index
    (``User.email_index``); ``where`` adds criteria. Candidates come from the
    index; each is checked against its decrypted value, so the result holds
    exactly the matching rows, never a colliding one.

    With ``startswith=``, ``contains=`` or ``between=(low, high)`` instead of
    a value (``lookup(session, attr, *where, contains="x")``), the column's
    search index answers (:mod:`sa_envelope.search`), re-checked the same way.
    """
    asked = [(k, v) for k, v in (("prefix", startswith), ("substring", contains), ("range", between)) if v is not None]
    if asked:
        if len(asked) > 1:
            raise ConfigurationError("pass one of startswith=, contains= and between= per lookup")
        kind, needle = asked[0]
        return index_for(attribute, kind).find(session, attribute, needle, args)  # type: ignore[no-any-return]
    if not args:
        raise ConfigurationError("lookup() needs a value, or one of startswith=, contains= and between=")
    value, *where = args
    entity, index_attr, index_type = _resolve(attribute)
    wanted = index_type.normalise(value)
    candidates = session.scalars(select(entity).where(index_attr.matches(value), *where)).all()
    return [
        obj
        for obj in candidates
        if (found := getattr(obj, index_type.source)) is not None and index_type.normalise(found) == wanted
    ]
