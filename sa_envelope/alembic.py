"""Alembic glue: operations for the key table, CMK rotation and column
encryption, and autogenerate rendering of ``EncryptedType``.

Importing this module registers the operations on ``alembic.op`` (that is
what ``Operations.register_operation`` does) and patches nothing else::

    import sa_envelope.alembic  # noqa: F401  (in env.py or script.py.mako)

    op.create_key_table()
    op.add_row_digest()  # upgrading a key table made before row keys were bound
    op.encrypt_column("patients", "email", EncryptedType(String(200)))
    op.decrypt_column("patients", "email", EncryptedType(String(200)))
    op.rewrap_keys()
    op.add_key_context_version()  # once, on a key table made by 0.1.0: then rewrap_keys

The data operations need a :class:`~sa_envelope.KeyManager` on the same
database: pass ``keys=`` or put it in ``config.attributes["sa_envelope.keys"]``
in env.py (see ``migrations_example/env.py``). They run their batches in
transactions of their own, inside Alembic's ``autocommit_block`` (which
commits the migration's work so far), so a crash loses at most one batch and
running the migration again resumes. Use ``transaction_per_migration=True``.
Autogenerate renders ``EncryptedType`` and ``BlindIndexType`` columns as
``sa_envelope.EncryptedType(sa.String(length=200))`` and adds ``import
sa_envelope`` to the migration. ``import sa_envelope`` loads this module by
itself when Alembic is running, so a default ``alembic init`` env.py whose
models use the types needs nothing more; ``render_item=render_item`` in
``context.configure`` does the same explicitly. The key table is in your
metadata when the KeyManager was given ``metadata=Base.metadata``.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import Column, MetaData, Table, inspect, select
from sqlalchemy.types import TypeDecorator, _Binary

from .errors import ConfigurationError, EnvelopeError

try:
    from alembic.autogenerate import comparators
    from alembic.autogenerate.api import AutogenContext
    from alembic.operations import MigrateOperation, Operations
except ImportError:  # the optional ``alembic`` extra
    raise ConfigurationError("sa_envelope.alembic needs Alembic: pip install 'sa-envelope[alembic]'") from None

from .columns.blindindex import BlindIndexType
from .columns.encrypted import EncryptedType
from .faults import fault_point
from .jobs.copy import copy_column
from .keys import table as kt
from .providers.spec import provider_from_spec

__all__ = [
    "AddKeyContextVersionOp",
    "AddRowDigestOp",
    "CreateKeyTableOp",
    "DecryptColumnOp",
    "DropKeyTableOp",
    "DropRowDigestOp",
    "EncryptColumnOp",
    "KEYS_ATTRIBUTE",
    "RewrapKeysOp",
    "render_item",
]

KEYS_ATTRIBUTE = "sa_envelope.keys"
ENCRYPT_SUFFIX = "__sa_envelope_new"


# --------------------------------------------------------------------------- key table


class _KeyTableOp(MigrateOperation):
    def __init__(self, table_name: str = kt.KEY_TABLE_NAME) -> None:
        self.table_name = table_name


@Operations.register_operation("create_key_table")
class CreateKeyTableOp(_KeyTableOp):
    """Create ``sa_envelope_keys`` (or ``table_name``) with its indexes."""

    @classmethod
    def create_key_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> DropKeyTableOp:
        return DropKeyTableOp(self.table_name)


@Operations.register_operation("drop_key_table")
class DropKeyTableOp(_KeyTableOp):
    """Drop the key table: every encrypted value becomes unreadable."""

    @classmethod
    def drop_key_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> CreateKeyTableOp:
        return CreateKeyTableOp(self.table_name)


@Operations.register_operation("add_row_digest")
class AddRowDigestOp(_KeyTableOp):
    """Upgrade a key table made before row keys were bound to their rows:
    add the ``row_digest`` column and its index (docs/format.md). Existing
    row keys stay unbound and keep working."""

    @classmethod
    def add_row_digest(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> DropRowDigestOp:
        return DropRowDigestOp(self.table_name)


@Operations.register_operation("drop_row_digest")
class DropRowDigestOp(_KeyTableOp):
    """The downgrade of ``add_row_digest``: bound row keys become unreadable."""

    @classmethod
    def drop_row_digest(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> AddRowDigestOp:
        return AddRowDigestOp(self.table_name)


@Operations.implementation_for(AddRowDigestOp)
def _add_row_digest(operations: Operations, op: AddRowDigestOp) -> None:
    table = kt.key_table(MetaData(), op.table_name)
    operations.add_column(op.table_name, table.c.row_digest._copy())
    operations.create_index(f"ix_{op.table_name}_row_digest", op.table_name, ["row_digest"])


@Operations.implementation_for(DropRowDigestOp)
def _drop_row_digest(operations: Operations, op: DropRowDigestOp) -> None:
    operations.drop_index(f"ix_{op.table_name}_row_digest", op.table_name)
    operations.drop_column(op.table_name, "row_digest")


@Operations.implementation_for(CreateKeyTableOp)
def _create_key_table(operations: Operations, op: CreateKeyTableOp) -> None:
    table = kt.key_table(MetaData(), op.table_name)
    operations.create_table(table.name, *(c._copy() for c in table.columns))
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        operations.create_index(str(index.name), table.name, [c.name for c in index.columns])


@Operations.implementation_for(DropKeyTableOp)
def _drop_key_table(operations: Operations, op: DropKeyTableOp) -> None:
    operations.drop_table(op.table_name)


@Operations.register_operation("add_key_context_version")
class AddKeyContextVersionOp(_KeyTableOp):
    """Upgrade a key table made before key context versions: add the
    nullable ``context_version`` column (existing rows read as version 1;
    run ``rewrap_keys`` afterwards to upgrade them)."""

    @classmethod
    def add_key_context_version(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))


@Operations.implementation_for(AddKeyContextVersionOp)
def _add_key_context_version(operations: Operations, op: AddKeyContextVersionOp) -> None:
    column = kt.key_table(MetaData(), op.table_name).c.context_version
    operations.add_column(op.table_name, column._copy())


# --------------------------------------------------------------------------- helpers


def _keys(operations: Operations, keys: Any) -> Any:
    """The KeyManager given to the operation, else the one env.py registered."""
    if keys is not None:
        return keys
    config = operations.get_context().config
    found = config.attributes.get(KEYS_ATTRIBUTE) if config is not None else None
    if found is None:
        raise ConfigurationError(
            f"this operation needs a KeyManager: pass keys=... or set "
            f"config.attributes[{KEYS_ATTRIBUTE!r}] in env.py"
        )
    return found


def _online(operations: Operations, name: str) -> None:
    if operations.get_context().as_sql:
        raise ConfigurationError(f"{name} reads and writes data: it cannot run in offline (--sql) mode")


# --------------------------------------------------------------------------- rewrap


@Operations.register_operation("rewrap_keys")
class RewrapKeysOp(MigrateOperation):
    """Re-wrap every table key under ``to`` (default: the KeyManager's provider).

    ``to`` and ``source`` are providers or CMK strings (``alias/app``, a key
    ARN, ``local:PATH``).

    Its natural downgrade is nothing: keys wrapped by the new CMK stay
    readable. Fails the migration if any key could not be re-wrapped, so the
    revision is not recorded and running it again finishes the job.
    """

    def __init__(self, to: Any = None, *, source: Any = None, keys: Any = None, batch_size: int = 100) -> None:
        self.to, self.source, self.keys, self.batch_size = to, source, keys, batch_size

    @classmethod
    def rewrap_keys(
        cls, operations: Operations, to: Any = None, *, source: Any = None, keys: Any = None, batch_size: int = 100
    ) -> Any:
        return operations.invoke(cls(to, source=source, keys=keys, batch_size=batch_size))


@Operations.implementation_for(RewrapKeysOp)
def _rewrap_keys(operations: Operations, op: RewrapKeysOp) -> None:
    _online(operations, "rewrap_keys")
    keys = _keys(operations, op.keys)
    to = provider_from_spec(op.to, check=True) if isinstance(op.to, str) else op.to
    source = provider_from_spec(op.source) if isinstance(op.source, str) else op.source
    with operations.get_context().autocommit_block():
        report = keys.rewrap(to, source=source, batch_size=op.batch_size)
    if not report.complete:
        raise EnvelopeError(f"{report}; run the migration again once the cause is fixed")


# --------------------------------------------------------------------------- columns


class _ColumnOp(MigrateOperation):
    def __init__(
        self, table_name: str, column_name: str, type_: EncryptedType, *,
        keys: Any = None, batch_size: int = 500,
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
        cls, operations: Operations, table_name: str, column_name: str, type_: EncryptedType,
        *, keys: Any = None, batch_size: int = 500,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, keys=keys, batch_size=batch_size))

    def reverse(self) -> DecryptColumnOp:
        return DecryptColumnOp(self.table_name, self.column_name, self.type_, keys=self.keys, batch_size=self.batch_size)


@Operations.register_operation("decrypt_column")
class DecryptColumnOp(_ColumnOp):
    """Turn an encrypted column back into plaintext of ``type_.inner`` (downgrade)."""

    @classmethod
    def decrypt_column(
        cls, operations: Operations, table_name: str, column_name: str, type_: EncryptedType,
        *, keys: Any = None, batch_size: int = 500,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, keys=keys, batch_size=batch_size))

    def reverse(self) -> EncryptColumnOp:
        return EncryptColumnOp(self.table_name, self.column_name, self.type_, keys=self.keys, batch_size=self.batch_size)


def bound_type(type_: EncryptedType, keys: Any, table: str, column: str) -> EncryptedType:
    """A copy of ``type_`` that encrypts for ``table.column`` with ``keys``."""
    return EncryptedType(
        type_.inner, keys, scope=type_.scope, deterministic=type_.deterministic,
        context=type_.context or f"{table}.{column}",
    )


def _storage_type(type_: Any, dialect: Any) -> Any:
    """What the column is in the database (ALTER needs the plain type)."""
    if isinstance(type_, TypeDecorator):
        return type_.load_dialect_impl(dialect)
    return type_


def _opens(enc: EncryptedType, value: Any) -> bool:
    """Whether ``value`` is a value of ``enc``'s column that decrypts."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return False
    try:
        enc.decrypt(bytes(value))
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
    return _opens(enc, first) == encrypting


def _drop_batch_debris(operations: Operations, table: str) -> None:
    """pysqlite runs CREATE TABLE outside the transaction, so an interrupted
    batch recreate leaves Alembic's scratch table behind: remove it."""
    bind = operations.get_bind()
    scratch = f"_alembic_tmp_{table}"
    if bind.dialect.name == "sqlite" and scratch in inspect(bind).get_table_names():
        operations.drop_table(scratch)


def _convert(
    operations: Operations, op: _ColumnOp, new_type: Any, enc: EncryptedType, encrypting: bool,
) -> None:
    """Add a temporary column, fill it in batches, swap it for the old one.

    Every step checks where a previous (crashed) run stopped: the temporary
    column may exist already; the old column may already be gone, or already
    converted (MariaDB, whose DDL is not transactional).
    """
    label = "encrypt_column" if encrypting else "decrypt_column"
    transform: Callable[[Any], Any] = enc.encrypt if encrypting else (lambda raw: enc.decrypt(bytes(raw)))
    _online(operations, label)
    keys = _keys(operations, op.keys)
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
            copy_column(keys.store, table, column, temp, transform, job=label, batch_size=op.batch_size)
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
    enc = bound_type(op.type_, _keys(operations, op.keys), op.table_name, op.column_name)
    _convert(operations, op, op.type_.copy(), enc, encrypting=True)


@Operations.implementation_for(DecryptColumnOp)
def _decrypt_column(operations: Operations, op: DecryptColumnOp) -> None:
    enc = bound_type(op.type_, _keys(operations, op.keys), op.table_name, op.column_name)
    _convert(operations, op, op.type_.inner, enc, encrypting=False)


# --------------------------------------------------------------------------- autogenerate


@comparators.dispatch_for("schema")
def _render_our_types(autogen_context: AutogenContext, upgrade_ops: Any, schemas: Any) -> None:
    """Make this autogenerate run render our types as :func:`render_item`
    does, with no ``render_item`` configured.

    Alembic asks the migration context's dialect impl (``render_type``)
    before it falls back to ``repr``; this wraps that method on this run's
    impl object only (Alembic's classes are untouched). A comparator is the
    hook: third-party comparators are called on every autogenerate run, and
    imports added here would be cleared before rendering, while the
    rendering call can add them.
    """
    impl = getattr(autogen_context.migration_context, "impl", None)
    if impl is None or getattr(impl, "_sa_envelope_renders", False):
        return
    alembic_render = impl.render_type

    def render_type(type_: Any, context: AutogenContext) -> Any:
        rendered = render_item("type", type_, context)
        return alembic_render(type_, context) if rendered is False else rendered

    impl.render_type = render_type
    impl._sa_envelope_renders = True


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Render ``sa_envelope.EncryptedType(sa.String(...))`` and
    ``sa_envelope.BlindIndexType(...)`` in autogenerated migrations, with the import.

    The rendered type has no KeyManager: DDL does not need one.
    """
    if type_ != "type" or not isinstance(obj, (EncryptedType, BlindIndexType)):
        return False
    autogen_context.imports.add("import sa_envelope")
    if isinstance(obj, BlindIndexType):
        return f"sa_envelope.{obj!r}"
    from alembic.autogenerate.render import _repr_type

    # EncryptedType's repr already renders the options; only the inner type
    # needs Alembic's rendering (``sa.String(length=200)``).
    options = repr(obj)[len(f"EncryptedType({obj.inner!r}") :]
    return f"sa_envelope.EncryptedType({_repr_type(obj.inner, autogen_context)}{options}"
