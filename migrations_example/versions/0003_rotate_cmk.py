"""CMK rotation: re-wrap every key to ``SA_ENVELOPE_CMK``.

Keep this revision last. Its downgrade does nothing (keys wrapped by the
new CMK stay readable), so the next rotation is::

    SA_ENVELOPE_CMK=<new CMK> alembic -c migrations_example/alembic.ini downgrade -1
    SA_ENVELOPE_CMK=<new CMK> alembic -c migrations_example/alembic.ini upgrade head

Re-running it when every key is already current does nothing and calls no
KMS encrypt operation. Across providers (local key file to KMS) set
``SA_ENVELOPE_SOURCE_CMK`` to the old one.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

import sa_envelope.alembic  # noqa: F401

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    source = op.get_context().config.attributes.get("sa_envelope.source")
    op.rewrap_keys(source=source, batch_size=100)


def downgrade() -> None:
    pass
