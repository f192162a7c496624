"""What the operations need from the migration: the KeyManager, an online run."""

from __future__ import annotations

from typing import Any

from alembic.operations import Operations

from ..errors import ConfigurationError

__all__ = ["KEYS_ATTRIBUTE", "manager_for", "require_online"]

KEYS_ATTRIBUTE = "sa_envelope.keys"


def manager_for(operations: Operations, keys: Any) -> Any:
    """The KeyManager given to the operation, else the one env.py registered."""
    if keys is not None:
        return keys
    config = operations.get_context().config
    found = config.attributes.get(KEYS_ATTRIBUTE) if config is not None else None
    if found is None:
        raise ConfigurationError(
            f"this operation needs a KeyManager: pass keys=... or set config.attributes[{KEYS_ATTRIBUTE!r}] in env.py"
        )
    return found


def require_online(operations: Operations, name: str) -> None:
    if operations.get_context().as_sql:
        raise ConfigurationError(f"{name} reads and writes data: it cannot run in offline (--sql) mode")
