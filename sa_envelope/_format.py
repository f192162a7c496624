"""The stored value: one module owns its bytes, its parser and its error.

Layout (every byte is documented in ``docs/format.md``)::

    AES-256-GCM (randomised):  01 | key id (8) | nonce (12) | ciphertext | tag (16)
    AES-SIV (deterministic):   02 | key id (8) | SIV tag (16) | ciphertext

The associated data is ``header || context`` where ``header`` is the first
nine bytes above and ``context`` is :func:`context_bytes` of the table and
column names. Binding the header stops a value from being re-labelled with
another key id; binding the context stops it from moving between columns or
tables.

This module knows nothing of SQLAlchemy. Its only error is
:class:`InvalidEnvelope`, deliberately opaque; callers add the table, column
and key id that they know and this module does not.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

__all__ = [
    "GCM_OVERHEAD",
    "HEADER_LEN",
    "InvalidEnvelope",
    "KEY_ID_LEN",
    "NONCE_LEN",
    "SIV_OVERHEAD",
    "TAG_LEN",
    "VERSION_GCM",
    "VERSION_SIV",
    "context_bytes",
    "decrypt_gcm",
    "decrypt_siv",
    "encrypt_gcm",
    "encrypt_siv",
    "format_key_id",
    "header",
    "parse_key_id",
    "read_header",
]

VERSION_GCM = 0x01
VERSION_SIV = 0x02
KEY_ID_LEN = 8
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = 1 + KEY_ID_LEN
GCM_OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN  # 37 bytes
SIV_OVERHEAD = HEADER_LEN + TAG_LEN  # 25 bytes

_U16 = struct.Struct(">H")
_HEADER = struct.Struct(">BQ")  # version, key id: parsed in one C call per value
_VERSIONS = frozenset((VERSION_GCM, VERSION_SIV))


class InvalidEnvelope(Exception):
    """The bytes are not a value this module wrote under this key and context."""


def format_key_id(key_id: int) -> str:
    """Show a key id the way docs, logs and the key table's users see it."""
    return f"{key_id:016x}"


def parse_key_id(text: str) -> int:
    """Read a key id written by :func:`format_key_id`."""
    value = int(text, 16)
    if not 0 < value < 1 << 64:
        raise ValueError("key id out of range")
    return value


def context_bytes(table: str, column: str) -> bytes:
    """Length-prefixed table and column names: no two pairs encode alike."""
    t = table.encode("utf-8")
    c = column.encode("utf-8")
    return _U16.pack(len(t)) + t + _U16.pack(len(c)) + c


def header(version: int, key_id: int) -> bytes:
    """The nine header bytes: version, then the key id big-endian."""
    return bytes((version,)) + key_id.to_bytes(KEY_ID_LEN, "big")


def read_header(value: bytes) -> tuple[int, int]:
    """Return ``(version, key_id)`` of a stored value without decrypting it.

    This is what re-encryption jobs use to find values under a given key.
    """
    if len(value) < HEADER_LEN:
        raise InvalidEnvelope("value shorter than its header")
    version, key_id = _HEADER.unpack_from(value)
    if version not in _VERSIONS:
        raise InvalidEnvelope("unknown format version")
    return version, key_id


def encrypt_gcm(
    aead: AESGCM,
    head: bytes,
    plaintext: bytes,
    context: bytes,
    nonce: bytes | None = None,
) -> bytes:
    """Seal ``plaintext``; ``nonce`` is a seam for known-answer tests only."""
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    return head + nonce + aead.encrypt(nonce, plaintext, head + context)


def decrypt_gcm(aead: AESGCM, value: bytes, context: bytes) -> bytes:
    """Open a value written by :func:`encrypt_gcm` (header already checked)."""
    if len(value) < GCM_OVERHEAD:
        raise InvalidEnvelope("value shorter than the format's overhead")
    head = value[:HEADER_LEN]
    nonce = value[HEADER_LEN : HEADER_LEN + NONCE_LEN]
    try:
        return aead.decrypt(nonce, value[HEADER_LEN + NONCE_LEN :], head + context)
    except InvalidTag:
        raise InvalidEnvelope("authentication failed") from None


def encrypt_siv(siv: AESSIV, head: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Seal deterministically: equal inputs under one key and context are equal."""
    return head + siv.encrypt(plaintext, [head + context])


def decrypt_siv(siv: AESSIV, value: bytes, context: bytes) -> bytes:
    """Open a value written by :func:`encrypt_siv` (header already checked)."""
    if len(value) < SIV_OVERHEAD:
        raise InvalidEnvelope("value shorter than the format's overhead")
    head = value[:HEADER_LEN]
    try:
        return siv.decrypt(value[HEADER_LEN:], [head + context])
    except InvalidTag:
        raise InvalidEnvelope("authentication failed") from None
