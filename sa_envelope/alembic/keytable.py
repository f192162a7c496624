"""Alembic operations on the key table, and the CMK rotation (``rewrap_keys``)."""

from __future__ import annotations

from typing import Any

from alembic.operations import MigrateOperation, Operations
from sqlalchemy import MetaData, PrimaryKeyConstraint, func, inspect, select

from ..columns.guardrows import guard_table
from ..errors import EnvelopeError
from ..keys import table as kt
from ..keys.live import LIVE_STATUSES
from ..providers.spec import provider_from_spec
from ..search.tokens import token_table
from .context import engine_of, manager_for, require_online

__all__ = [
    "AddKeyContextVersionOp",
    "AddRowDigestOp",
    "CreateGuardTableOp",
    "CreateKeyTableOp",
    "CreateSearchTableOp",
    "DropGuardTableOp",
    "DropKeyTableOp",
    "DropRowDigestOp",
    "DropSearchTableOp",
    "RewrapKeysOp",
    "UpgradeSearchTableOp",
]

# --------------------------------------------------------------------------- key table


class _KeyTableOp(MigrateOperation):
    def __init__(self, table_name: str = kt.KEY_TABLE_NAME) -> None:
        self.table_name = table_name


@Operations.register_operation("create_key_table")
class CreateKeyTableOp(_KeyTableOp):
    """Create ``sa_envelope_keys`` (or ``table_name``) with its indexes, the
    search-token table and the uniqueness guards' table."""

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


@Operations.register_operation("create_search_table")
class CreateSearchTableOp(_KeyTableOp):
    """Upgrade a deployment made before search indexes: create the token
    table beside the key table (``create_key_table`` now makes both)."""

    @classmethod
    def create_search_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> DropSearchTableOp:
        return DropSearchTableOp(self.table_name)


@Operations.register_operation("drop_search_table")
class DropSearchTableOp(_KeyTableOp):
    """Drop the token table: every search index is gone (rebuild with verify_index(fix=True))."""

    @classmethod
    def drop_search_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> CreateSearchTableOp:
        return CreateSearchTableOp(self.table_name)


def _create_like(operations: Operations, table: Any, name: str | None = None) -> None:
    """Create ``table``'s shape (as ``name``): columns, an explicit primary key
    in its own column order, dialect options (``sqlite_with_rowid``), indexes."""
    primary: list[Any] = []
    if table.primary_key.name is not None:  # declared as a constraint: (owner, name, token, row_key)
        primary = [PrimaryKeyConstraint(*table.primary_key.columns.keys(), name=table.primary_key.name)]
    operations.create_table(name or table.name, *(c._copy() for c in table.columns), *primary, **table.kwargs)
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        operations.create_index(str(index.name), table.name, [c.name for c in index.columns])


@Operations.implementation_for(CreateKeyTableOp)
def _create_key_table(operations: Operations, op: CreateKeyTableOp) -> None:
    _create_like(operations, kt.key_table(MetaData(), op.table_name))
    _create_like(operations, token_table(MetaData(), op.table_name))
    _create_like(operations, guard_table(MetaData(), op.table_name))


@Operations.implementation_for(DropKeyTableOp)
def _drop_key_table(operations: Operations, op: DropKeyTableOp) -> None:
    operations.drop_table(guard_table(MetaData(), op.table_name).name, if_exists=True)
    operations.drop_table(token_table(MetaData(), op.table_name).name, if_exists=True)
    operations.drop_table(op.table_name)


@Operations.implementation_for(CreateSearchTableOp)
def _create_search_table(operations: Operations, op: CreateSearchTableOp) -> None:
    _create_like(operations, token_table(MetaData(), op.table_name))


@Operations.implementation_for(DropSearchTableOp)
def _drop_search_table(operations: Operations, op: DropSearchTableOp) -> None:
    operations.drop_table(token_table(MetaData(), op.table_name).name)


@Operations.register_operation("create_guard_table")
class CreateGuardTableOp(_KeyTableOp):
    """Create the uniqueness guards' table beside the key table
    ``table_name`` (``sa_envelope_guards``; ``x_guards`` beside ``x_keys``),
    for a deployment made before uniqueness guards or, with a custom key
    table name, before the guard table followed it (``create_key_table``
    makes it). Without it, UNIQUE across the live keys of a rotation is
    checked under a lock on the key-table row instead, which serialises
    every checked write of a table. Refused while a deterministic key is
    being rotated (docs/rotation.md: the old processes lock the old table)."""

    @classmethod
    def create_guard_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> DropGuardTableOp:
        return DropGuardTableOp(self.table_name)


@Operations.register_operation("drop_guard_table")
class DropGuardTableOp(_KeyTableOp):
    """Drop the guards' table beside the key table ``table_name`` (safe
    between rotations; during one, checked writes fall back to the key-row
    lock). ``op.drop_guard_table()`` also drops the ``sa_envelope_guards``
    an older version made beside a custom key table, once no KeyManager of
    the default name uses it."""

    @classmethod
    def drop_guard_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))

    def reverse(self) -> CreateGuardTableOp:
        return CreateGuardTableOp(self.table_name)


@Operations.implementation_for(CreateGuardTableOp)
def _create_guard_table(operations: Operations, op: CreateGuardTableOp) -> None:
    if not operations.get_context().as_sql:
        _refuse_during_rotation(operations, op.table_name)
    _create_like(operations, guard_table(MetaData(), op.table_name))


def _refuse_during_rotation(operations: Operations, table_name: str) -> None:
    """Writers of the version before lock another guard table (or the key
    row): they and the new version's would not wait for each other while a
    deterministic column has two live keys."""
    bind = operations.get_bind()
    if not inspect(bind).has_table(table_name):
        return
    keys = kt.key_table(MetaData(), table_name)
    live = (
        select(keys.c.owner_table)
        .where(keys.c.scope == kt.SCOPE_DETERMINISTIC, keys.c.status.in_(LIVE_STATUSES))
        .group_by(keys.c.owner_table)
        .having(func.count() > 1)
    )
    rotating = sorted(bind.execute(live).scalars())
    if rotating:
        raise EnvelopeError(
            f"a deterministic key of {', '.join(rotating)} is being rotated: create the guard table "
            "once its re-encryption has retired the old key (docs/rotation.md)"
        )


@Operations.implementation_for(DropGuardTableOp)
def _drop_guard_table(operations: Operations, op: DropGuardTableOp) -> None:
    operations.drop_table(guard_table(MetaData(), op.table_name).name)


@Operations.register_operation("upgrade_search_table")
class UpgradeSearchTableOp(_KeyTableOp):
    """Move a token table of the first shape (no primary key; an index
    ``ix_<table>_lookup``) to the clustered one (primary key ``(owner, name,
    token, row_key)``; SQLite ``WITHOUT ROWID``): every distinct token copied,
    duplicates dropped (docs/format.md). Does nothing on a table already
    upgraded. Not reversible: the old shape holds the same tokens, slower."""

    @classmethod
    def upgrade_search_table(cls, operations: Operations, table_name: str = kt.KEY_TABLE_NAME) -> Any:
        return operations.invoke(cls(table_name))


@Operations.implementation_for(UpgradeSearchTableOp)
def _upgrade_search_table(operations: Operations, op: UpgradeSearchTableOp) -> None:
    table = token_table(MetaData(), op.table_name)
    found = inspect(operations.get_bind())
    if found.get_pk_constraint(table.name).get("constrained_columns"):
        return
    old = f"{table.name}_v1"
    for index in found.get_indexes(table.name):
        operations.drop_index(str(index["name"]), table.name)
    operations.rename_table(table.name, old)
    _create_like(operations, table)
    columns = "owner, name, row_key, token"
    operations.execute(f"INSERT INTO {table.name} ({columns}) SELECT DISTINCT {columns} FROM {old}")
    operations.drop_table(old)


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
    require_online(operations, "rewrap_keys")
    keys = manager_for(operations, op.keys)
    to = provider_from_spec(op.to, check=True) if isinstance(op.to, str) else op.to
    source = provider_from_spec(op.source) if isinstance(op.source, str) else op.source
    with operations.get_context().autocommit_block():
        report = keys.rewrap(to, source=source, batch_size=op.batch_size, engine=engine_of(operations))
    if not report.complete:
        raise EnvelopeError(f"{report}; run the migration again once the cause is fixed")
