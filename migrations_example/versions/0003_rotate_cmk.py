"""CMK rotation: re-wrap every key to ``SA_ENVELOPE_CMK``.

Keep this revision last. Its downgrade does nothing (keys wrapped by the
new CMK stay readable), so the next rotation is::

    SA_ENVELOPE_CMK=<new CMK> SA_ENVELOPE_SOURCE_CMK=<old CMK> alembic -c migrations_example/alembic.ini downgrade -1
    SA_ENVELOPE_CMK=<new CMK> SA_ENVELOPE_SOURCE_CMK=<old CMK> alembic -c migrations_example/alembic.ini upgrade head

Re-running it when every key is already current does nothing and calls no
KMS encrypt operation. ``SA_ENVELOPE_SOURCE_CMK`` names the CMK (or key
file) the keys are wrapped by now: only a configured CMK is trusted, so a
key row naming any other is reported and left as it is, never re-wrapped.

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
