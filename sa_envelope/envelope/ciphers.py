"""The algorithms a data key can have, and the local wrap of row keys.

:data:`ALGORITHMS` is the one table from an algorithm's name (as stored in
the key table) to its cipher class, key size and value-format version.
:class:`HmacKey` is the "cipher" of a blind-index key. Row keys are wrapped
here, locally, by their table key: ``os.urandom(32)`` sealed with
AES-256-GCM, with associated data binding the row key id, the table key id
and the owner table (:func:`row_key_ad`). Stored form (``wrapped_key``)::

    01 | nonce (12) | AES-256-GCM(row key) | tag (16)

    associated data: b"sa-envelope row key\\x00" | row key id (8, big-endian)
                     | table key id (8, big-endian) | owner table (UTF-8)

Like :mod:`.format`, this module knows nothing of SQLAlchemy; its only
error is :class:`~.format.InvalidEnvelope`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from . import format as fmt

__all__ = [
    "ALGORITHMS",
    "HmacKey",
    "ROW_KEY_ALGORITHM",
    "ROW_KEY_CIPHER",
    "open_row_key",
    "row_key_ad",
    "wrap_row_keys",
]

ROW_KEY_ALGORITHM = "AES-256-GCM"
ROW_KEY_CIPHER = AESGCM
ROW_KEY_BYTES = 32
ROW_WRAP_VERSION = 0x01
WRAPPED_ROW_KEY_LEN = 1 + fmt.NONCE_LEN + ROW_KEY_BYTES + fmt.TAG_LEN
_AD_LABEL = b"sa-envelope row key\x00"
_WRAP_BYTE = bytes((ROW_WRAP_VERSION,))
_DERIVE_LABEL = b"sa-envelope blind index\x00"


class HmacKey:
    """The "cipher" object cached for a blind-index key: derives column subkeys."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)

    def subkey(self, context: bytes) -> Any:
        """An HMAC object keyed for one index column, ready to ``copy()``."""
        derived = hmac.new(self._key, _DERIVE_LABEL + context, hashlib.sha256).digest()
        return hmac.new(derived, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "HmacKey(<hidden>)"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("an HmacKey holds key material and cannot be pickled")


ALGORITHMS: Mapping[str, tuple[type, int, int]] = {
    # name: (cipher class, key bytes, format version)
    "AES-256-GCM": (AESGCM, 32, fmt.VERSION_GCM),
    "AES-256-SIV": (AESSIV, 64, fmt.VERSION_SIV),
    "HMAC-SHA256": (HmacKey, 32, 0),  # blind indexes: no stored envelope, no version
}


def row_key_ad(key_id: int, parent_id: int, owner: str) -> bytes:
    """Associated data of a wrapped row key: it unwraps only as this key,
    under this parent, for this table (the owner comes last: unambiguous)."""
    return _AD_LABEL + fmt.key_id_bytes(key_id) + fmt.key_id_bytes(parent_id) + owner.encode("utf-8")


def wrap_row_keys(
    parent: AESGCM, parent_id: int, owner: str, key_ids: list[int]
) -> list[tuple[bytes, AESGCM]]:
    """Fresh row keys for ``key_ids``: ``(wrapped bytes, cipher)`` for each.

    Runs once per new row (20,000 times for 20,000 rows): one ``os.urandom``
    call for all the material and all the nonces, the associated data's tail
    built once.
    """
    count = len(key_ids)
    material = os.urandom(ROW_KEY_BYTES * count)
    nonces = os.urandom(fmt.NONCE_LEN * count)
    tail = fmt.key_id_bytes(parent_id) + owner.encode("utf-8")
    seal = parent.encrypt
    out = []
    for i, key_id in enumerate(key_ids):
        plain = material[i * ROW_KEY_BYTES : (i + 1) * ROW_KEY_BYTES]
        nonce = nonces[i * fmt.NONCE_LEN : (i + 1) * fmt.NONCE_LEN]
        wrapped = _WRAP_BYTE + nonce + seal(nonce, plain, _AD_LABEL + fmt.key_id_bytes(key_id) + tail)
        out.append((wrapped, AESGCM(plain)))
    return out


def open_row_key(parent: Any, parent_version: int, key_id: int, parent_id: int, owner: str, wrapped: Any) -> bytes:
    """The one place a wrapped row key is opened (format in the module docstring).

    A tampered row may name a parent that is no AES-GCM table key, or hold
    bytes too short for a nonce: each fails as a bad tag would.
    """
    wrapped = bytes(wrapped)
    if parent_version != fmt.VERSION_GCM or len(wrapped) != WRAPPED_ROW_KEY_LEN or wrapped[0] != ROW_WRAP_VERSION:
        raise fmt.InvalidEnvelope("row key does not unwrap under its table key")
    body = wrapped[1:]
    try:
        return bytes(parent.decrypt(body[: fmt.NONCE_LEN], body[fmt.NONCE_LEN :], row_key_ad(key_id, parent_id, owner)))
    except (InvalidTag, ValueError):
        raise fmt.InvalidEnvelope("row key does not unwrap under its table key") from None
