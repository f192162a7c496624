"""Which stored key may be a write key: the rule a database writer cannot steer.

Anyone who can write the key table can insert rows of their own making,
un-retire old keys and relabel rows. None of that may choose the key new
values are sealed under. So a provider-wrapped key row is a write-key
candidate only when

* its wrapping key is one the provider trusts (checked with no KMS call);
* its ``created_at`` is not in the future beyond :data:`CLOCK_SKEW`;
* its metadata is authenticated: key context version 2 binds id, owner,
  scope, algorithm, created time and namespace, so a relabelled row fails to
  unwrap. Version 1 rows (written before) bind owner and id only: they still
  decrypt, and stay write keys only for the deterministic and blind-index
  scopes (a new key there would split equality queries) until ``rewrap``
  upgrades them;

and the current key of an (owner, scope) is the newest candidate whose
metadata authenticates, whatever its status says (a status is not
authenticated): an older key has an authenticated successor, so un-retiring
it does not bring it back. :class:`~.store.KeyStore` applies this on every
write-key miss; ``verify`` reports the rows it refuses with the same reasons.
"""

from __future__ import annotations

import datetime as dt

from ..envelope import format as fmt
from ..providers.base import CONTEXT_VERSION, LEGACY_CONTEXT_VERSION, KeyMeta, KeyProvider
from . import table as kt

__all__ = ["CANDIDATES", "CLOCK_SKEW", "key_meta", "refusal", "version_of"]

CLOCK_SKEW = dt.timedelta(minutes=2)  # how far ahead another host's clock may run
CANDIDATES = 20  # newest key rows of an (owner, scope) looked at per write-key miss


def version_of(record: kt.KeyRecord) -> int:
    """The key context version a row was wrapped with (NULL: version 1)."""
    return record.context_version or LEGACY_CONTEXT_VERSION


def key_meta(record: kt.KeyRecord, namespace: str | None) -> KeyMeta:
    """What the row says about its key, as the provider context binds it."""
    return KeyMeta(
        key_id=fmt.format_key_id(record.id),
        owner=record.owner_table,
        scope=record.scope,
        algorithm=record.algorithm,
        created=kt.created_seconds(record.created_at),
        namespace=namespace,
        version=version_of(record),
    )


def in_future(record: kt.KeyRecord, now: dt.datetime) -> bool:
    """Dated later than this host's clock allows another's to run ahead."""
    created = record.created_at
    if created is None:
        return False
    if created.tzinfo is None:
        created = created.replace(tzinfo=dt.timezone.utc)
    return created > now + CLOCK_SKEW


def refusal(record: kt.KeyRecord, provider: KeyProvider, now: dt.datetime) -> str | None:
    """Why this provider-wrapped row can never be a write key, found without
    unwrapping it; ``None``: it can, once its metadata authenticates."""
    if not provider.trusts(record.wrapping_key_id):
        return f"wrapped by untrusted key {record.wrapping_key_id}"
    if in_future(record, now):
        return f"created_at {record.created_at} is in the future"
    if version_of(record) < CONTEXT_VERSION and record.scope not in kt.SINGLETON_SCOPES:
        return "key context version 1 does not authenticate scope, algorithm or created time (run rewrap)"
    return None
