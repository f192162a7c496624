"""Encrypting (and decrypting) an existing column in place: ``op.encrypt_column``."""

from __future__ import annotations

from typing import Any, Callable

from alembic.operations import MigrateOperation, Operations
from sqlalchemy import Column, MetaData, Table, inspect, select
from sqlalchemy.types import TypeDecorator, _Binary

from ..columns import binds
from ..columns.encrypted import EncryptedType
from ..errors import ConfigurationError, EnvelopeError
from ..faults import fault_point
from ..jobs.copy import copy_column
from .context import engine_of, manager_for, require_online

__all__ = ["DecryptColumnOp", "ENCRYPT_SUFFIX", "EncryptColumnOp", "bound_type"]

ENCRYPT_SUFFIX = "__sa_envelope_new"

# --------------------------------------------------------------------------- columns


class _ColumnOp(MigrateOperation):
    def __init__(
        self, table_name: str, column_name: str, type_: EncryptedType, *, keys: Any = None, batch_size: int = 500
    ) -> None:
        if not isinstance(type_, EncryptedType):
            raise ConfigurationError("give the column's EncryptedType, e.g. EncryptedType(String(200))")
        self.table_name, self.column_name, self.type_ = table_name, column_name, type_
        self.keys, self.batch_size = keys, batch_size


@Operations.register_operation("encrypt_column")
class EncryptColumnOp(_ColumnOp):
    """Encrypt an existing plaintext column in place (batched, resumable)."""

    @classmethod
    def encrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        keys: Any = None,
        batch_size: int = 500,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, keys=keys, batch_size=batch_size))

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(
            self.table_name, self.column_name, self.type_, keys=self.keys, batch_size=self.batch_size
        )


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnOp):
    """Turn an encrypted column back into plaintext of ``type_.inner`` (downgrade)."""

    @classmethod
    def decrypt_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        keys: Any = None,
        batch_size: int = 500,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, keys=keys, batch_size=batch_size))

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(
            self.table_name, self.column_name, self.type_, keys=self.keys, batch_size=self.batch_size
        )


def bound_type(type_: EncryptedType, keys: Any, table: str, column: str) -> EncryptedType:
    """A copy of ``type_`` that encrypts for ``table.column`` with ``keys``."""
    return EncryptedType(
        type_.inner,
        keys,
        scope=type_.scope,
        deterministic=type_.deterministic,
        context=type_.context or f"{table}.{column}",
    )


def _storage_type(type_: Any, dialect: Any) -> Any:
    """What the column is in the database (ALTER needs the plain type)."""
    if isinstance(type_, TypeDecorator):
        return type_.load_dialect_impl(dialect)
    return type_


def _opens(enc: EncryptedType, value: Any, dialect: Any) -> bool:
    """Whether ``value`` is a value of ``enc``'s column that decrypts (with
    the keys of the migration's database)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return False
    try:
        enc.decrypt(bytes(value), binds.require(enc, dialect))
    except EnvelopeError:
        return False
    return True


def _already_converted(operations: Operations, table: str, column: str, enc: EncryptedType, encrypting: bool) -> bool:
    """After a swap that committed without the revision being stamped (MariaDB's
    DDL is not transactional), the column is already in its new form."""
    bind = operations.get_bind()
    reflected = Table(table, MetaData(), autoload_with=bind).c[column]
    first = bind.execute(select(reflected).where(reflected.is_not(None)).limit(1)).scalar()
    if first is None:  # no value to tell by: the storage type does
        return isinstance(reflected.type, _Binary) == encrypting
    return _opens(enc, first, operations.get_bind().dialect) == encrypting


def _drop_batch_debris(operations: Operations, table: str) -> None:
    """pysqlite runs CREATE TABLE outside the transaction, so an interrupted
    batch recreate leaves Alembic's scratch table behind: remove it."""
    bind = operations.get_bind()
    scratch = f"_alembic_tmp_{table}"
    if bind.dialect.name == "sqlite" and scratch in inspect(bind).get_table_names():
        operations.drop_table(scratch)


def _convert(operations: Operations, op: _ColumnOp, new_type: Any, enc: EncryptedType, encrypting: bool) -> None:
    """Add a temporary column, fill it in batches, swap it for the old one.

    Every step checks where a previous (crashed) run stopped: the temporary
    column may exist already; the old column may already be gone, or already
    converted (MariaDB, whose DDL is not transactional).
    """
    label = "encrypt_column" if encrypting else "decrypt_column"
    require_online(operations, label)
    keys = manager_for(operations, op.keys)
    store = keys.store_for(engine_of(operations))
    via = binds.require(enc, operations.get_bind().dialect)
    transform: Callable[[Any], Any] = (
        (lambda value: enc.encrypt(value, store)) if encrypting else (lambda raw: enc.decrypt(bytes(raw), via))
    )
    table, column = op.table_name, op.column_name
    temp = column + ENCRYPT_SUFFIX
    columns: dict[str, Any] = {c["name"]: c for c in inspect(operations.get_bind()).get_columns(table)}
    if column in columns and temp not in columns and _already_converted(operations, table, column, enc, encrypting):
        return
    nullable = columns.get(column, columns.get(temp, {})).get("nullable", True)
    if column in columns:
        if temp not in columns:
            operations.add_column(table, Column(temp, new_type, nullable=True))
        with operations.get_context().autocommit_block():
            copy_column(store, table, column, temp, transform, job=label, batch_size=op.batch_size)
    elif temp not in columns:
        raise ConfigurationError(f"table {table} has neither column {column} nor {temp}")
    storage = _storage_type(new_type, operations.get_bind().dialect)
    _drop_batch_debris(operations, table)
    fault_point(f"{label}.before_swap")
    with operations.batch_alter_table(table) as batch:
        if column in columns:
            batch.drop_column(column)
        batch.alter_column(temp, new_column_name=column, nullable=nullable, existing_type=storage)
    fault_point(f"{label}.after_swap")


@Operations.implementation_for(EncryptColumnOp)
def _encrypt_column(operations: Operations, op: EncryptColumnOp) -> None:
    enc = bound_type(op.type_, manager_for(operations, op.keys), op.table_name, op.column_name)
    _convert(operations, op, op.type_.copy(), enc, encrypting=True)


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, op: DecryptColumnOp) -> None:
    enc = bound_type(op.type_, manager_for(operations, op.keys), op.table_name, op.column_name)
    _convert(operations, op, op.type_.inner, enc, encrypting=False)
