"""Helpers for tests that write key rows themselves, as the application would.

Since key context version 2 binds a key's created time, a test that ages a
key by editing ``created_at`` must re-wrap it under the new context too (an
edit alone is tampering, and the key is refused): :func:`age_keys`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import Engine, select, update

from sa_envelope.keys import table as kt
from sa_envelope.keys.choice import key_meta
from sa_envelope.providers.base import key_context

__all__ = ["age_keys", "context_of"]


def context_of(record: kt.KeyRecord, namespace: str | None = None) -> dict[str, str]:
    """The provider context a stored key row was wrapped with."""
    return key_context(key_meta(record, namespace))


def age_keys(engine: Engine, keys: Any, by: dt.timedelta) -> None:
    """Date every provider-wrapped key of ``keys`` back by ``by``, legitimately:
    unwrapped with its context, wrapped again under the aged one."""
    table, provider = keys.table, keys.provider
    with engine.begin() as conn:
        records = [kt.KeyRecord.from_row(r) for r in conn.execute(select(table).where(kt.provider_wrapped(table)))]
        for record in records:
            assert record.created_at is not None and record.wrapped_key is not None
            aged = dataclasses.replace(record, created_at=(record.created_at - by).replace(microsecond=0))
            plaintext = provider.unwrap(record.wrapped_key, context_of(record), record.wrapping_key_id)
            wrapped = provider.wrap(plaintext, context_of(aged)).wrapped
            conn.execute(
                update(table).where(table.c.id == record.id).values(created_at=aged.created_at, wrapped_key=wrapped)
            )
