"""Online column migrations: expand, backfill, contract (docs/migrations.md).

Encrypting a column the application keeps writing::

    op.add_encrypted_shadow("users", "email", EncryptedType(sa.String(200), deterministic=True))   # expand
    # deploy the model with migrating_from="email"; then, for a small table:
    op.backfill_column("users", "email", EncryptedType(sa.String(200), deterministic=True))
    # (or ``sa-envelope encrypt-column --table users --column email`` for a large one)
    op.contract_encrypted_column("users", "email", EncryptedType(sa.String(200), deterministic=True))

and back (``add_plaintext_shadow``, ``backfill_column(..., direction="decrypt")``,
``contract_plaintext_column``). The shadow is ``<column>__encrypted`` (or
``__plaintext``) unless ``shadow=`` names it. The contract refuses, with
:class:`~sa_envelope.MigrationIncompleteError`, while a row's shadow is
still empty; otherwise it drops the old column, renames the shadow to the
column's name (batch mode, so SQLite works) and recreates the old column's
indexes and unique constraints where they still mean something: always for
plaintext, for ciphertext only when deterministic (equal values, equal bytes).
Unlike ``op.encrypt_column`` (:mod:`.columns`), nothing here needs the
application to stop writing.
"""

from __future__ import annotations

from typing import Any

from alembic.operations import MigrateOperation, Operations
from sqlalchemy import Column, MetaData, Table, and_, func, inspect, select

from ..columns.encrypted import EncryptedType
from ..errors import ConfigurationError, MigrationIncompleteError
from ..jobs.backfill import backfill, disagreeing, job_name
from ..jobs.claims import CLAIMS_TABLE, claims_table
from .columns import _storage_type, bound_type
from .context import manager_for, require_online

__all__ = [
    "AddShadowOp",
    "BackfillColumnOp",
    "ContractColumnOp",
    "DropShadowOp",
    "ENCRYPTED_SHADOW",
    "PLAINTEXT_SHADOW",
    "shadow_name",
]

ENCRYPTED_SHADOW, PLAINTEXT_SHADOW = "__encrypted", "__plaintext"


def shadow_name(column: str, encrypting: bool, shadow: str | None = None) -> str:
    """The shadow column's name: ``shadow`` or ``<column>__encrypted`` / ``__plaintext``."""
    return shadow or column + (ENCRYPTED_SHADOW if encrypting else PLAINTEXT_SHADOW)


class _OnlineOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        encrypting: bool,
        shadow: str | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(type_, EncryptedType):
            raise ConfigurationError("give the column's EncryptedType, e.g. EncryptedType(String(200))")
        self.table_name, self.column_name, self.type_ = table_name, column_name, type_
        self.encrypting, self.options = encrypting, options
        self.shadow = shadow_name(column_name, encrypting, shadow)


@Operations.register_operation("add_encrypted_shadow")
@Operations.register_operation("add_plaintext_shadow", "add_plaintext_shadow")
class AddShadowOp(_OnlineOp):
    """Expand: add the empty shadow column (nullable) next to the live one."""

    @classmethod
    def add_encrypted_shadow(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        shadow: str | None = None,
        index: bool = False,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, encrypting=True, shadow=shadow, index=index))

    @classmethod
    def add_plaintext_shadow(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        shadow: str | None = None,
        index: bool = False,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, encrypting=False, shadow=shadow, index=index))

    def reverse(self) -> DropShadowOp:
        return DropShadowOp(
            self.table_name, self.column_name, self.type_, encrypting=self.encrypting, shadow=self.shadow
        )


@Operations.register_operation("drop_shadow")
class DropShadowOp(_OnlineOp):
    """Roll an expand back: drop the shadow (the live column never changed)."""

    @classmethod
    def drop_shadow(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        encrypting: bool = True,
        shadow: str | None = None,
    ) -> Any:
        return operations.invoke(cls(table_name, column_name, type_, encrypting=encrypting, shadow=shadow))

    def reverse(self) -> AddShadowOp:
        return AddShadowOp(
            self.table_name, self.column_name, self.type_, encrypting=self.encrypting, shadow=self.shadow
        )


@Operations.register_operation("backfill_column")
class BackfillColumnOp(_OnlineOp):
    """Fill the shadow inside the migration (small tables; the CLI for large ones)."""

    @classmethod
    def backfill_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        direction: str = "encrypt",
        shadow: str | None = None,
        batch_size: int = 500,
        keys: Any = None,
    ) -> Any:
        op = cls(
            table_name,
            column_name,
            type_,
            encrypting=direction == "encrypt",
            shadow=shadow,
            batch_size=batch_size,
            keys=keys,
            direction=direction,
        )
        return operations.invoke(op)


@Operations.register_operation("contract_encrypted_column")
@Operations.register_operation("contract_plaintext_column", "contract_plaintext_column")
class ContractColumnOp(_OnlineOp):
    """Contract: check no row is left, drop the old column, rename the shadow."""

    @classmethod
    def contract_encrypted_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        shadow: str | None = None,
        verify: bool = False,
        keys: Any = None,
    ) -> Any:
        return operations.invoke(
            cls(table_name, column_name, type_, encrypting=True, shadow=shadow, verify=verify, keys=keys)
        )

    @classmethod
    def contract_plaintext_column(
        cls,
        operations: Operations,
        table_name: str,
        column_name: str,
        type_: EncryptedType,
        *,
        shadow: str | None = None,
        verify: bool = False,
        keys: Any = None,
    ) -> Any:
        return operations.invoke(
            cls(table_name, column_name, type_, encrypting=False, shadow=shadow, verify=verify, keys=keys)
        )


def _shadow_type(op: _OnlineOp) -> Any:
    """The shadow's column type: the EncryptedType (no twin options: DDL only), or its inner type."""
    t = op.type_
    return (
        EncryptedType(t.inner, scope=t.scope, deterministic=t.deterministic, context=t.context)
        if op.encrypting
        else t.inner
    )


@Operations.implementation_for(AddShadowOp)
def _add_shadow(operations: Operations, op: AddShadowOp) -> None:
    operations.add_column(op.table_name, Column(op.shadow, _shadow_type(op), nullable=True))
    if op.options.get("index"):
        operations.create_index(f"ix_{op.table_name}_{op.shadow}", op.table_name, [op.shadow])


@Operations.implementation_for(DropShadowOp)
def _drop_shadow(operations: Operations, op: DropShadowOp) -> None:
    indexes = _indexes_on(operations.get_bind(), op.table_name, op.shadow)
    with operations.batch_alter_table(op.table_name) as batch:
        _drop_indexes(batch, indexes)
        batch.drop_column(op.shadow)


def _drop_indexes(batch: Any, indexes: list[tuple[str, list[str], bool, str]]) -> None:
    for name, _, _, kind in indexes:
        if kind == "index":
            batch.drop_index(name)
        else:
            batch.drop_constraint(name, type_="unique")


@Operations.implementation_for(BackfillColumnOp)
def _backfill_column(operations: Operations, op: BackfillColumnOp) -> None:
    require_online(operations, "backfill_column")
    keys = manager_for(operations, op.options.get("keys"))
    enc = bound_type(op.type_, keys, op.table_name, op.column_name)
    with operations.get_context().autocommit_block():
        backfill(
            keys.store,
            enc,
            op.table_name,
            op.column_name,
            op.shadow,
            direction=op.options["direction"],
            batch_size=op.options["batch_size"],
            progress=False,
        )


def _left(bind: Any, table_name: str, column: str, shadow: str) -> int:
    """Rows whose old half is set and whose shadow is not."""
    table = Table(table_name, MetaData(), autoload_with=bind)
    todo = and_(table.c[column].is_not(None), table.c[shadow].is_(None))
    return int(bind.execute(select(func.count()).select_from(table).where(todo)).scalar_one())


def _indexes_on(bind: Any, table: str, column: str) -> list[tuple[str, list[str], bool, str]]:
    """(name, columns, unique, "index" | "constraint") of what names ``column``."""
    insp = inspect(bind)
    found: dict[str, tuple[str, list[str], bool, str]] = {}
    for ix in insp.get_indexes(table):
        if column in ix["column_names"] and ix["name"] and not ix.get("duplicates_constraint"):
            found[ix["name"]] = (ix["name"], list(ix["column_names"]), bool(ix.get("unique")), "index")
    for uc in insp.get_unique_constraints(table):
        if column in uc["column_names"] and uc["name"] and uc["name"] not in found:
            found[uc["name"]] = (uc["name"], list(uc["column_names"]), True, "constraint")
    return list(found.values())


@Operations.implementation_for(ContractColumnOp)
def _contract(operations: Operations, op: ContractColumnOp) -> None:
    require_online(operations, "contract_encrypted_column" if op.encrypting else "contract_plaintext_column")
    bind = operations.get_bind()
    table, column, shadow = op.table_name, op.column_name, op.shadow
    columns = {c["name"]: c for c in inspect(bind).get_columns(table)}
    if shadow not in columns:
        if column in columns:
            return  # contracted already (MariaDB commits DDL as it goes)
        raise ConfigurationError(f"table {table} has neither column {column} nor {shadow}", table=table)
    indexes: list[tuple[str, list[str], bool, str]] = []
    transitional: list[tuple[str, list[str], bool, str]] = []
    if column in columns:
        left = _left(bind, table, column, shadow)
        what, again = f"no value in {shadow} yet", ""
        if not left and op.options.get("verify"):  # every shadow opened and compared
            keys = manager_for(operations, op.options.get("keys"))
            enc = bound_type(op.type_, keys, table, column)
            direction = "encrypt" if op.encrypting else "decrypt"
            left = disagreeing(keys.store, enc, table, column, shadow, direction=direction)
            what, again = f"no value, or another value than {column}, in {shadow}", " --restart"
        if left:
            tool = "encrypt-column" if op.encrypting else "decrypt-column"
            raise MigrationIncompleteError(
                f"{table}.{column}: {left} rows have {what}; run "
                f"`sa-envelope {tool} --table {table} --column {column}{again}` (or op.backfill_column) to the end first",
                table=table,
                column=column,
            )
        indexes = _indexes_on(bind, table, column)
        transitional = _indexes_on(bind, table, shadow)  # made for the dual reads (index=True): superseded
    nullable = columns.get(column, columns[shadow]).get("nullable", True)
    storage = _storage_type(_shadow_type(op), bind.dialect)
    with operations.batch_alter_table(table) as batch:
        _drop_indexes(batch, indexes + transitional)
        if column in columns:
            batch.drop_column(column)
        batch.alter_column(shadow, new_column_name=column, nullable=nullable, existing_type=storage)
    if op.encrypting and not op.type_.deterministic:
        indexes = []  # randomised ciphertext: an index or a UNIQUE would mean nothing
    for name, cols, unique, kind in indexes:
        if kind == "index":
            operations.create_index(name, table, cols, unique=unique)
        else:
            with operations.batch_alter_table(table) as batch:
                batch.create_unique_constraint(name, cols)
    _forget_job(operations, table, column, op.encrypting)


def _forget_job(operations: Operations, table: str, column: str, encrypting: bool) -> None:
    """The backfill's claimed ranges are of no use once contracted."""
    bind = operations.get_bind()
    if CLAIMS_TABLE not in inspect(bind).get_table_names():
        return
    job = job_name(table, column, "encrypt" if encrypting else "decrypt")
    claims = claims_table(MetaData())
    bind.execute(claims.delete().where(claims.c.job == job))
