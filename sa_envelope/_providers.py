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

import hashlib
import hmac
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import ConfigurationError, KeyProviderError

__all__ = ["DataKey", "KeyProvider", "LocalKeyProvider"]

DATA_KEY_BYTES = 32
Context = Mapping[str, str]


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


def _canonical(context: Context) -> bytes:
    """The context as bytes that do not depend on dict order."""
    return json.dumps(dict(sorted(context.items())), separators=(",", ":")).encode()


class LocalKeyProvider(KeyProvider):
    """A 32-byte master key held in process, for development, tests and demos.

    Wrapped keys are ``nonce (12) || AES-256-GCM(ciphertext || tag)`` with the
    canonical JSON of the encryption context as associated data.
    """

    def __init__(self, key_bytes: bytes, key_id: str | None = None) -> None:
        if len(key_bytes) != DATA_KEY_BYTES:
            raise ConfigurationError("a local master key must be exactly 32 bytes")
        self._aead = AESGCM(bytes(key_bytes))
        self._key_id = key_id or self._fingerprint(key_bytes)

    @staticmethod
    def _fingerprint(key_bytes: bytes) -> str:
        """A stable name for the key that reveals nothing about it."""
        mac = hmac.new(bytes(key_bytes), b"sa-envelope local key id", hashlib.sha256)
        return "local:" + mac.hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], key_id: str | None = None) -> LocalKeyProvider:
        """Load a key file, creating a random one (mode 0600) where none exists."""
        file = Path(path)
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "wb") as out:
                    out.write(os.urandom(DATA_KEY_BYTES))
                    out.flush()
                    os.fsync(out.fileno())
        data = file.read_bytes()
        if len(data) != DATA_KEY_BYTES:
            raise ConfigurationError(f"key file {file} does not hold exactly 32 bytes")
        return cls(data, key_id=key_id)

    @property
    def wrapping_key_id(self) -> str:
        return self._key_id

    def wrap(self, plaintext: bytes, context: Context) -> DataKey:
        nonce = os.urandom(12)
        wrapped = nonce + self._aead.encrypt(nonce, plaintext, _canonical(context))
        return DataKey(plaintext, wrapped, self._key_id)

    def unwrap(self, wrapped: bytes, context: Context, wrapping_key_id: str) -> bytes:
        if wrapping_key_id != self._key_id:
            raise KeyProviderError(
                f"key was wrapped by {wrapping_key_id}, this provider holds {self._key_id}",
                table=context.get("sa_envelope:table"),
                key_id=context.get("sa_envelope:key"),
            )
        try:
            return self._aead.decrypt(wrapped[:12], wrapped[12:], _canonical(context))
        except (InvalidTag, ValueError):
            raise KeyProviderError(
                "wrapped key does not authenticate under the local master key",
                table=context.get("sa_envelope:table"),
                key_id=context.get("sa_envelope:key"),
            ) from None

    def __repr__(self) -> str:
        return f"LocalKeyProvider(key_id={self._key_id!r})"
