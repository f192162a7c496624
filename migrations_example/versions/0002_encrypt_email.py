"""Encrypt the formerly plaintext ``patients.email`` in place.

Batched and resumable: if this revision is interrupted, run the upgrade
again. The downgrade decrypts the column back to ``VARCHAR(200)``.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sa_envelope.alembic  # noqa: F401
from sa_envelope import EncryptedType

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.encrypt_column("patients", "email", EncryptedType(sa.String(200)), batch_size=500)


def downgrade() -> None:
    op.decrypt_column("patients", "email", EncryptedType(sa.String(200)), batch_size=500)
