"""Expand: add the encrypted shadow ``users.email__encrypted`` (docs/migrations.md).

Deploy this, then the application release whose model declares
``EncryptedType(String(200), keys, deterministic=True, migrating_from="email")``
on the shadow; once every instance runs it, fill the shadow with
``sa-envelope encrypt-column --table users --column email --deterministic``.
The downgrade drops the shadow: the plaintext column never changed.

Revision ID: o002
Revises: o001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sa_envelope.alembic  # noqa: F401
from sa_envelope import EncryptedType

revision = "o002"
down_revision = "o001"
branch_labels = None
depends_on = None

EMAIL = EncryptedType(sa.String(200), deterministic=True)


def upgrade() -> None:
    op.add_encrypted_shadow("users", "email", EMAIL, index=True)  # indexed: equality reads both halves


def downgrade() -> None:
    op.drop_shadow("users", "email", EMAIL)
