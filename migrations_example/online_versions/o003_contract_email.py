"""Contract: drop the plaintext ``users.email``; the shadow becomes ``email``.

Refuses (MigrationIncompleteError, naming the rows left) until the backfill
has filled every row; ``verify=True`` also opens every shadow and compares
it with the plaintext (a row an instance of the old release changed after
the new one had written it), which reads the whole table: fine here. Recreates ``ix_users_email`` (unique) on the
ciphertext: the column is deterministic, so equal emails have equal bytes.
Deploy the application release that declares plain
``EncryptedType(String(200), keys, deterministic=True)`` on ``email`` with it.

The downgrade is the reverse migration done inside the revision (fine for
a small table): a plaintext shadow, filled by decrypting, swapped in; and
an empty encrypted shadow again, which is the state of revision o002.

Revision ID: o003
Revises: o002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import sa_envelope.alembic  # noqa: F401
from sa_envelope import EncryptedType

revision = "o003"
down_revision = "o002"
branch_labels = None
depends_on = None

EMAIL = EncryptedType(sa.String(200), deterministic=True)


def upgrade() -> None:
    op.contract_encrypted_column("users", "email", EMAIL, verify=True)  # every shadow opened and compared


def downgrade() -> None:
    op.add_plaintext_shadow("users", "email", EMAIL)
    op.backfill_column("users", "email", EMAIL, direction="decrypt")
    op.contract_plaintext_column("users", "email", EMAIL)
    op.add_encrypted_shadow("users", "email", EMAIL, index=True)
