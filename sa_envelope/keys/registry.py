"""The KeyManagers of this process, by a random token: how an unpickled column type finds its own again.

A pickle of a declaration (``pickle.dumps(metadata)``) must never carry key
material, so a column type pickles its KeyManager as a token: random, made
when the manager is, meaningless outside this process and derived from
nothing secret. Unpickled in the same process, the type finds the manager
by it (:mod:`sa_envelope.columns.portable`); in another process the token
finds nothing, and the type refuses values until ``keys.adopt(metadata)``
gives it a manager. Entries are weak: the registry keeps no manager alive.
"""

from __future__ import annotations

import secrets
import weakref
from typing import Any

__all__ = ["enrol", "find"]

_managers: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def enrol(manager: Any) -> str:
    """Register ``manager``; its token."""
    token = secrets.token_hex(16)
    _managers[token] = manager
    return token


def find(token: str | None) -> Any:
    """The manager of ``token`` in this process, or ``None``."""
    return _managers.get(token) if token else None
