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
from typing import Mapping

__all__ = ["Context", "DataKey", "KeyProvider", "context_key_id", "context_table", "key_context"]

DATA_KEY_BYTES = 32
Context = Mapping[str, str]
CONTEXT_TABLE = "sa_envelope:table"
CONTEXT_KEY = "sa_envelope:key"


def key_context(owner: str, key_id: str) -> dict[str, str]:
    """The encryption context bound to a provider-wrapped key (visible in
    CloudTrail): its owner table and its key id, as :func:`format_key_id` shows it."""
    return {CONTEXT_TABLE: owner, CONTEXT_KEY: key_id}


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

    def owns(self, wrapping_key_id: str) -> bool:
        """Whether a key recorded as wrapped by ``wrapping_key_id`` is ours."""
        return wrapping_key_id == self.wrapping_key_id

    def rewrap(
        self, wrapped: bytes, context: Context, wrapping_key_id: str
    ) -> tuple[bytes, str] | None:
        """Move a key wrapped by another master key of the same service.

        Return ``(new wrapped bytes, new wrapping key id)``, or ``None`` where
        the provider cannot do it without seeing the plaintext (the caller
        then unwraps with the source provider and wraps with this one).
        """
        return None
