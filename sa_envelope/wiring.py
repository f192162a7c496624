"""The pieces that serve one bound engine, made and connected in one place.

:class:`~sa_envelope.manager.KeyManager` is a facade; what it gives each
engine it is bound to (:mod:`sa_envelope.keys.engines`) is made here: a key
cache, a tracker with the query guards, a store, the live keys of rotations,
the per-engine write hooks (redaction, dual writes of migrating columns,
uniqueness across keys) and, once a row-scoped column exists, the row keys
with their read prefetch and Core write hook. Every listener is installed
through the binding's :class:`~sa_envelope.keys.listeners.Listeners`, so
that ``unbind`` removes exactly these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Table

from . import redact
from .columns import dualwrite, uniqueness
from .columns.comparisons import check_compiled
from .columns.guard import check_statement
from .keys.cache import CacheLimits, KeyCache
from .keys.engines import Binding
from .keys.live import LiveKeys, LivePolicy
from .keys.rollover import RolloverPolicy
from .keys.store import KeyStore
from .keys.tracking import Tracker
from .providers.base import KeyProvider
from .rows.core import install_core_hook
from .rows.keys import RowKeys
from .rows.prefetch import install_prefetch

__all__ = ["Settings", "wire_engine", "wire_rows"]


@dataclass
class Settings:
    """What every binding of one manager shares."""

    provider: KeyProvider
    table: Table
    limits: CacheLimits
    rollover: RolloverPolicy
    namespace: str | None
    live: LivePolicy | None


def wire_engine(settings: Settings, engine: Engine) -> Binding:
    """The pieces that serve ``engine`` (once per bound engine)."""
    key_cache = KeyCache(settings.limits)
    tracker = Tracker(engine, key_cache, on_execute=check_statement, on_compiled=check_compiled)
    store = KeyStore(
        engine, settings.provider, settings.table, key_cache, tracker, settings.rollover, namespace=settings.namespace
    )
    redact.hide_rows(engine)  # SQLAlchemy logs rows after decryption
    dualwrite.install(tracker.listeners)  # migrating columns: both halves written, merged on load
    uniqueness.install(tracker.listeners)  # UNIQUE deterministic columns across keys during a rotation
    return Binding(engine, tracker, store, LiveKeys(store, settings.live))


def wire_rows(manager: Any, binding: Binding) -> None:
    """Row keys for ``binding``, with the read prefetch and the Core write hook
    (which find ``manager``'s row-scoped columns)."""
    rows = RowKeys(binding.store)
    install_prefetch(rows, manager)
    install_core_hook(rows, manager)
    binding.rows = rows
