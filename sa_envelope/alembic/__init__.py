"""Alembic glue: operations for the key table, CMK rotation and column
encryption, and autogenerate rendering of ``EncryptedType``.

Importing this module registers the operations on ``alembic.op`` (that is
what ``Operations.register_operation`` does) and patches nothing else::

    import sa_envelope.alembic  # noqa: F401  (in env.py or script.py.mako)

    op.create_key_table()
    op.add_row_digest()  # upgrading a key table made before row keys were bound
    op.create_guard_table()  # upgrading a deployment made before uniqueness guards (table_name= as above)
    op.encrypt_column("patients", "email", EncryptedType(String(200)))
    op.decrypt_column("patients", "email", EncryptedType(String(200)))
    op.rewrap_keys()
    # online (the application keeps writing; docs/migrations.md):
    op.add_encrypted_shadow("users", "email", EncryptedType(String(200), deterministic=True))
    op.backfill_column("users", "email", EncryptedType(String(200), deterministic=True))
    op.contract_encrypted_column("users", "email", EncryptedType(String(200), deterministic=True))
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

from ..errors import ConfigurationError

try:
    import alembic.operations  # noqa: F401
except ImportError:  # the optional ``alembic`` extra
    raise ConfigurationError("sa_envelope.alembic needs Alembic: pip install 'sa-envelope[alembic]'") from None

from .columns import ENCRYPT_SUFFIX, DecryptColumnOp, EncryptColumnOp, bound_type
from .context import KEYS_ATTRIBUTE
from .online import AddShadowOp, BackfillColumnOp, ContractColumnOp, DropShadowOp, shadow_name
from .keytable import (
    AddKeyContextVersionOp,
    AddRowDigestOp,
    CreateKeyTableOp,
    CreateSearchTableOp,
    DropKeyTableOp,
    DropRowDigestOp,
    DropSearchTableOp,
    RewrapKeysOp,
)
from .render import render_item

__all__ = [
    "AddKeyContextVersionOp",
    "AddRowDigestOp",
    "AddShadowOp",
    "BackfillColumnOp",
    "ContractColumnOp",
    "DropShadowOp",
    "CreateKeyTableOp",
    "CreateSearchTableOp",
    "DecryptColumnOp",
    "DropKeyTableOp",
    "DropRowDigestOp",
    "DropSearchTableOp",
    "ENCRYPT_SUFFIX",
    "EncryptColumnOp",
    "KEYS_ATTRIBUTE",
    "RewrapKeysOp",
    "bound_type",
    "render_item",
    "shadow_name",
]
