"""Alembic environment for the sa-envelope example, configured from the
environment only (see alembic.ini for the variables).

It builds one KeyManager on the migration's engine and hands it to the
sa-envelope operations through ``config.attributes["sa_envelope.keys"]``.
Each revision runs in its own transaction, as the data operations (which
commit batch by batch) require.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

import sa_envelope.alembic
from sa_envelope import KeyManager, provider_from_spec

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _require(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise SystemExit(f"migrations_example: set {name}")
    return value


def run_migrations_offline() -> None:
    context.configure(url=_require("SA_ENVELOPE_DATABASE_URL"), literal_binds=True,
                      render_item=sa_envelope.alembic.render_item)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_require("SA_ENVELOPE_DATABASE_URL"), poolclass=pool.QueuePool)
    provider = provider_from_spec(_require("SA_ENVELOPE_CMK"), create=True)
    source_spec = os.environ.get("SA_ENVELOPE_SOURCE_CMK", "").strip()
    keys = KeyManager(engine, provider)
    config.attributes[sa_envelope.alembic.KEYS_ATTRIBUTE] = keys
    config.attributes["sa_envelope.source"] = provider_from_spec(source_spec) if source_spec else None
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=None,
                transaction_per_migration=True,
                render_item=sa_envelope.alembic.render_item,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
