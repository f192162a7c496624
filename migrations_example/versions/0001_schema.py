"""Key table and an example table with encrypted columns.

``email`` starts out as plaintext, as in an application that adopts
sa-envelope late; revision 0002 encrypts it in place.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sa_envelope.alembic  # noqa: F401
from sa_envelope import EncryptedType

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_key_table()
    op.create_table(
        "patients",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", EncryptedType(sa.String(200)), nullable=False),
        sa.Column("ssn", EncryptedType(sa.String(11), deterministic=True), nullable=True),
        sa.Column("email", sa.String(200), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("patients")
    op.drop_key_table()
