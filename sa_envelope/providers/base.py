"""Key providers: the small interface that wraps and unwraps data keys.

A provider is whatever holds the master key (the CMK). sa-envelope asks it to
make a data key, to unwrap one, and optionally to move a wrapped key to
another master key without exposing it (KMS ``ReEncrypt``). Nothing above
this interface knows which provider it has; implement it to plug in another
KMS or an HSM. Providers know no tables: the caller passes an encryption
context (a small ``str -> str`` mapping) that the provider must bind to the
wrapped key, so a wrapped key moved to another table fails to unwrap.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import UntrustedKeyError

__all__ = [
    "CONTEXT_VERSION",
    "Context",
    "DataKey",
    "KeyMeta",
    "KeyProvider",
    "context_key_id",
    "context_table",
    "key_context",
]

DATA_KEY_BYTES = 32
Context = Mapping[str, str]
CONTEXT_VERSION = 2  # what new keys are written with (docs/format.md, "The key context")
LEGACY_CONTEXT_VERSION = 1  # key rows written before the context bound their metadata
CONTEXT_TABLE = "sa_envelope:table"
CONTEXT_KEY = "sa_envelope:key"
CONTEXT_FIELDS = (  # version 2, beyond table and key
    ("sa_envelope:v", "version"),
    ("sa_envelope:scope", "scope"),
    ("sa_envelope:alg", "algorithm"),
    ("sa_envelope:created", "created"),
)
CONTEXT_NAMESPACE = "sa_envelope:ns"


@dataclass(frozen=True)
class KeyMeta:
    """Everything that decides how a provider-wrapped key is used.

    ``created`` is whole seconds since the Unix epoch (UTC): every backend
    stores whole seconds exactly. ``version`` 1 binds only owner and key id.
    """

    key_id: str
    owner: str
    scope: str
    algorithm: str
    created: int
    namespace: str | None = None
    version: int = CONTEXT_VERSION


def key_context(meta: KeyMeta | str, key_id: str | None = None) -> dict[str, str]:
    """The encryption context bound to a provider-wrapped key (the KMS
    encryption context; the local provider's associated data). Visible in
    CloudTrail, and the ``sa_envelope:*`` keys IAM conditions can name.

    Version 1 (rows written before it existed; also ``key_context(owner,
    key_id)``): owner table and key id only. Version 2 adds the context
    version, scope, algorithm, created time and, when the manager has one,
    the namespace: a row relabelled in any of them no longer unwraps.
    """
    if isinstance(meta, str):
        return {CONTEXT_TABLE: meta, CONTEXT_KEY: key_id or ""}
    context = {CONTEXT_TABLE: meta.owner, CONTEXT_KEY: meta.key_id}
    if meta.version == LEGACY_CONTEXT_VERSION:
        return context
    for name, attr in CONTEXT_FIELDS:
        context[name] = str(getattr(meta, attr))
    if meta.namespace:
        context[CONTEXT_NAMESPACE] = meta.namespace
    return context


def context_table(context: Context) -> str | None:
    """The owner table a context names (for error messages)."""
    return context.get(CONTEXT_TABLE)


def context_key_id(context: Context) -> str | None:
    """The key id a context names (for error messages)."""
    return context.get(CONTEXT_KEY)


@dataclass(frozen=True, repr=False)
class DataKey:
    """A fresh data key: its plaintext, its wrapped form and who wrapped it."""

    plaintext: bytes
    wrapped: bytes
    wrapping_key_id: str

    def __repr__(self) -> str:  # never show key material
        return f"DataKey(wrapping_key_id={self.wrapping_key_id!r}, plaintext=<hidden>)"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a DataKey holds key material and cannot be pickled")


class KeyProvider(ABC):
    """Wraps data keys under a master key. Implement the three abstract methods.

    ``wrapping_key_id`` names the master key new keys are wrapped by; it is
    recorded in the key table, so it should be stable and unambiguous (the
    KMS key ARN, not an alias). Constructing a provider must not touch the
    network: the first call does.
    """

    @property
    @abstractmethod
    def wrapping_key_id(self) -> str:
        """Identifier of the master key that wraps new data keys."""

    @abstractmethod
    def wrap(self, plaintext: bytes, context: Context) -> DataKey:
        """Wrap ``plaintext`` under the master key, binding ``context``."""

    @abstractmethod
    def unwrap(self, wrapped: bytes, context: Context, wrapping_key_id: str) -> bytes:
        """Return the plaintext of a wrapped key, or raise ``KeyProviderError``."""

    def generate(self, context: Context, size: int = DATA_KEY_BYTES) -> DataKey:
        """Make a new random data key of ``size`` bytes, wrapped.

        KMS overrides this with ``GenerateDataKey``: one call, and the key
        comes from the KMS's own random source.
        """
        return self.wrap(os.urandom(size), context)

    def trusted_wrapping_keys(self) -> frozenset[str]:
        """The wrapping keys whose wrapped keys this provider may unwrap: its
        own and the ``previous`` ones it was given. Providers override this."""
        return frozenset({self.wrapping_key_id})

    def trusts(self, wrapping_key_id: str) -> bool:
        """The trust rule, in its one home: a key row is unwrapped only if the
        wrapping key it names is one this provider was configured with. A
        database writer can name any CMK; only the configuration says ours."""
        return wrapping_key_id in self.trusted_wrapping_keys()

    def require_trusted(self, wrapping_key_id: str, context: Context) -> None:
        """Refuse (without calling the KMS) a key wrapped by an untrusted key."""
        if not self.trusts(wrapping_key_id):
            key_id = context_key_id(context)
            raise UntrustedKeyError(
                f"key {key_id or '-'} is wrapped by {wrapping_key_id}, which this provider does not "
                f"trust (it trusts {', '.join(sorted(self.trusted_wrapping_keys()))})",
                table=context_table(context),
                key_id=key_id,
            )

    def owns(self, wrapping_key_id: str) -> bool:
        """Whether a key recorded as wrapped by ``wrapping_key_id`` is ours."""
        return self.trusts(wrapping_key_id)

    def rewrap(
        self, wrapped: bytes, context: Context, wrapping_key_id: str, new_context: Context | None = None
    ) -> tuple[bytes, str] | None:
        """Move a key wrapped by another master key of the same service,
        binding ``new_context`` (default: ``context``) to the new wrap.

        Return ``(new wrapped bytes, new wrapping key id)``, or ``None`` where
        the provider cannot do it without seeing the plaintext (the caller
        then unwraps with the source provider and wraps with this one).
        """
        return None
