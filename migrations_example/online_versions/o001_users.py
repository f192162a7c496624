"""Key table and ``users`` with a plaintext, unique ``email``: the starting point.

Revision ID: o001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sa_envelope.alembic  # noqa: F401

revision = "o001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_key_table()
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(200), nullable=True),
    )
    op.create_index("ix_users_email", "users", ["email"], unique=True)


def downgrade() -> None:
    op.drop_table("users")
    op.drop_key_table()
