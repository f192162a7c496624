"""A master key in a local file, for development, tests and demos."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigurationError, UnauthenticatedKeyError
from .base import DATA_KEY_BYTES, Context, DataKey, KeyProvider, context_key_id, context_table

__all__ = ["LocalKeyProvider"]


def _canonical(context: Context) -> bytes:
    """The context as bytes that do not depend on dict order."""
    return json.dumps(dict(sorted(context.items())), separators=(",", ":")).encode()


class LocalKeyProvider(KeyProvider):
    """A 32-byte master key held in process, for development, tests and demos.

    Wrapped keys are ``nonce (12) || AES-256-GCM(ciphertext || tag)`` with the
    canonical JSON of the encryption context as associated data. ``previous``
    are older master keys (after a rotation) whose wrapped keys still unwrap;
    keys wrapped by any other key id are refused.
    """

    def __init__(self, key_bytes: bytes, key_id: str | None = None, *, previous: Iterable[bytes] = ()) -> None:
        self._aead = self._cipher(key_bytes)
        self._key_id = key_id or self._fingerprint(key_bytes)
        self._aeads = {self._fingerprint(k): self._cipher(k) for k in previous}
        self._aeads[self._key_id] = self._aead

    @staticmethod
    def _cipher(key_bytes: bytes) -> AESGCM:
        if len(key_bytes) != DATA_KEY_BYTES:
            raise ConfigurationError("a local master key must be exactly 32 bytes")
        return AESGCM(bytes(key_bytes))

    @staticmethod
    def _fingerprint(key_bytes: bytes) -> str:
        """A stable name for the key that reveals nothing about it."""
        mac = hmac.new(bytes(key_bytes), b"sa-envelope local key id", hashlib.sha256)
        return "local:" + mac.hexdigest()[:16]

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], key_id: str | None = None, *, previous: Iterable[str | os.PathLike[str]] = ()
    ) -> LocalKeyProvider:
        """Load a key file, creating a random one (mode 0600) where none exists.
        ``previous``: older key files, trusted for unwrapping only."""
        if not os.fspath(path):
            raise ConfigurationError("no key file given: pass the path of a 32-byte key file")
        old = [_read_key_file(Path(p)) for p in previous]
        file = Path(path)
        if file.is_dir():
            raise ConfigurationError(f"key file {file} is a directory: pass the path of a 32-byte key file")
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
        return cls(_read_key_file(file), key_id=key_id, previous=old)

    @property
    def wrapping_key_id(self) -> str:
        return self._key_id

    def trusted_wrapping_keys(self) -> frozenset[str]:
        return frozenset(self._aeads)

    def wrap(self, plaintext: bytes, context: Context) -> DataKey:
        nonce = os.urandom(12)
        wrapped = nonce + self._aead.encrypt(nonce, plaintext, _canonical(context))
        return DataKey(plaintext, wrapped, self._key_id)

    def unwrap(self, wrapped: bytes, context: Context, wrapping_key_id: str) -> bytes:
        self.require_trusted(wrapping_key_id, context)
        try:
            return self._aeads[wrapping_key_id].decrypt(wrapped[:12], wrapped[12:], _canonical(context))
        except (InvalidTag, ValueError):
            raise UnauthenticatedKeyError(
                "wrapped key does not authenticate under the local master key",
                table=context_table(context),
                key_id=context_key_id(context),
            ) from None

    def __repr__(self) -> str:
        return f"LocalKeyProvider(key_id={self._key_id!r})"


def _read_key_file(file: Path) -> bytes:
    data = file.read_bytes()
    if len(data) != DATA_KEY_BYTES:
        raise ConfigurationError(f"key file {file} does not hold exactly 32 bytes")
    return data
