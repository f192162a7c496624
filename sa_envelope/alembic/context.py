"""What the operations need from the migration: the KeyManager, an online run."""

from __future__ import annotations

from typing import Any

from alembic.operations import Operations
from sqlalchemy import Connection, Engine

from ..errors import ConfigurationError

__all__ = ["KEYS_ATTRIBUTE", "engine_of", "manager_for", "require_online"]

KEYS_ATTRIBUTE = "sa_envelope.keys"


def manager_for(operations: Operations, keys: Any) -> Any:
    """The KeyManager given to the operation, else the one env.py registered,
    bound to the migration's engine: its keys are read and written on the
    migration's database (``engine_of`` names that engine to the manager)."""
    if keys is None:
        config = operations.get_context().config
        keys = config.attributes.get(KEYS_ATTRIBUTE) if config is not None else None
    if keys is None:
        raise ConfigurationError(
            f"this operation needs a KeyManager: pass keys=... or set config.attributes[{KEYS_ATTRIBUTE!r}] in env.py"
        )
    bind = operations.get_bind()
    if isinstance(bind, Connection):
        keys.bind(bind.engine)
    return keys


def engine_of(operations: Operations) -> Engine:
    """The migration's engine, which the data operations run their jobs on."""
    return operations.get_bind().engine


def require_online(operations: Operations, name: str) -> None:
    if operations.get_context().as_sql:
        raise ConfigurationError(f"{name} reads and writes data: it cannot run in offline (--sql) mode")
