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

import functools
import os
import struct
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

__all__ = [
    "associated_data",
    "GCM_OVERHEAD",
    "HEADER_LEN",
    "GCM_BODY_START",
    "HEADER_SLICE",
    "KEY_ID_SLICE",
    "NONCE_SLICE",
    "InvalidEnvelope",
    "KEY_ID_LEN",
    "KEY_ID_START",
    "KEY_ID_SUBSTR",
    "NONCE_LEN",
    "SIV_BODY_START",
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
    "is_key_id",
    "key_id_bytes",
    "key_id_from",
    "key_id_of",
    "new_key_id",
    "new_key_ids",
    "new_nonce",
    "open_value",
    "opener",
    "parse_key_id",
    "read_header",
    "seal_function",
]

VERSION_GCM = 0x01
VERSION_SIV = 0x02
KEY_ID_LEN = 8
KEY_ID_START = 1  # value[KEY_ID_START:HEADER_LEN] is the key id, big-endian
KEY_ID_BITS = 63  # ids fit a signed BIGINT on every backend
NONCE_LEN = 12
TAG_LEN = 16
HEADER_LEN = KEY_ID_START + KEY_ID_LEN
_BODY = HEADER_LEN + NONCE_LEN  # value[HEADER_LEN:_BODY] is the GCM nonce
HEADER_SLICE = slice(0, HEADER_LEN)  # value[HEADER_SLICE]: the header (read memos key on it)
KEY_ID_SLICE = slice(KEY_ID_START, HEADER_LEN)  # value[KEY_ID_SLICE]: the key id's 8 bytes
NONCE_SLICE = slice(HEADER_LEN, _BODY)  # value[NONCE_SLICE]: the GCM nonce
GCM_BODY_START = _BODY  # value[GCM_BODY_START:]: GCM ciphertext and tag
SIV_BODY_START = HEADER_LEN  # value[SIV_BODY_START:]: the SIV tag and ciphertext
# a fresh AES-GCM nonce from the OS for every value (see associated_data)
new_nonce: Callable[[], bytes] = functools.partial(os.urandom, NONCE_LEN)
KEY_ID_SUBSTR = (KEY_ID_START + 1, KEY_ID_LEN)  # SQL substr(value, start, length): counts from 1
GCM_OVERHEAD = HEADER_LEN + NONCE_LEN + TAG_LEN  # 37 bytes
SIV_OVERHEAD = HEADER_LEN + TAG_LEN  # 25 bytes

_U16 = struct.Struct(">H")
_HEADER = struct.Struct(">BQ")  # version, key id: parsed in one C call per value
_VERSIONS = frozenset((VERSION_GCM, VERSION_SIV))


class InvalidEnvelope(Exception):
    """The bytes are not a value this module wrote under this key and context."""


def is_key_id(key_id: int) -> bool:
    """Whether ``key_id`` is one :func:`new_key_id` can make (the one bound)."""
    return 0 < key_id < 1 << KEY_ID_BITS


def key_id_from(material: bytes) -> int:
    """A key id from the first 8 bytes of ``material`` (random or a digest):
    63 bits, 0 mapped to 1."""
    return (int.from_bytes(material[:KEY_ID_LEN], "big") >> (8 * KEY_ID_LEN - KEY_ID_BITS)) or 1


def new_key_id() -> int:
    """A random 63-bit key id."""
    return key_id_from(os.urandom(KEY_ID_LEN))


def new_key_ids(count: int) -> list[int]:
    """``count`` random key ids from one ``os.urandom`` call (row keys in bulk)."""
    raw = os.urandom(KEY_ID_LEN * count)
    return [key_id_from(raw[i : i + KEY_ID_LEN]) for i in range(0, len(raw), KEY_ID_LEN)]


def format_key_id(key_id: int) -> str:
    """Show a key id the way docs, logs and the key table's users see it."""
    return f"{key_id:016x}"


def parse_key_id(text: str) -> int:
    """Read a key id written by :func:`format_key_id`."""
    value = int(text, 16)
    if not is_key_id(value):
        raise ValueError("key id out of range")
    return value


def key_id_bytes(key_id: int) -> bytes:
    """The key id as it stands in a header (what SQL matches stale values by)."""
    return key_id.to_bytes(KEY_ID_LEN, "big")


def key_id_of(value: bytes) -> int:
    """The key id a stored value names, read without any check (key prefetch:
    a wrong id only loads a key that the full read path then refuses)."""
    return int.from_bytes(value[KEY_ID_START:HEADER_LEN], "big")


def context_bytes(table: str, column: str) -> bytes:
    """Length-prefixed table and column names: no two pairs encode alike."""
    t = table.encode("utf-8")
    c = column.encode("utf-8")
    return _U16.pack(len(t)) + t + _U16.pack(len(c)) + c


def header(version: int, key_id: int) -> bytes:
    """The nine header bytes: version, then the key id big-endian."""
    return bytes((version,)) + key_id_bytes(key_id)


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


def encrypt_gcm(aead: AESGCM, head: bytes, plaintext: bytes, context: bytes, nonce: bytes | None = None) -> bytes:
    """Seal ``plaintext``; ``nonce`` is a seam for known-answer tests only."""
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    return head + nonce + aead.encrypt(nonce, plaintext, head + context)


def decrypt_gcm(aead: AESGCM, value: bytes, context: bytes) -> bytes:
    """Open a value written by :func:`encrypt_gcm` (header already checked)."""
    if len(value) < GCM_OVERHEAD:
        raise InvalidEnvelope("value shorter than the format's overhead")
    head = value[:HEADER_LEN]
    nonce = value[HEADER_LEN:_BODY]
    try:
        return aead.decrypt(nonce, value[_BODY:], head + context)
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


def seal_function(deterministic: bool) -> Callable[[Any, bytes, bytes, bytes], bytes]:
    """How a column seals its values: AES-SIV when deterministic, else AES-GCM."""
    return encrypt_siv if deterministic else encrypt_gcm


def open_value(cipher: Any, version: int, value: bytes, context: bytes) -> bytes:
    """Open a value whose header gave ``version``: the one GCM/SIV dispatch."""
    if version == VERSION_SIV:
        return decrypt_siv(cipher, value, context)
    return decrypt_gcm(cipher, value, context)


def opener(
    cipher: Any, version: int, head: bytes, context: bytes, then: Callable[[bytes], Any] | None = None
) -> Callable[[bytes], Any]:
    """A fast opener for values of one key and one context: the associated
    data precomputed, no header parse, no length checks. For read memos only:
    a value it cannot open raises whatever the cipher raises, and the caller
    falls back to :func:`open_value`, which raises :class:`InvalidEnvelope`.
    ``then`` (a codec's decode) is applied in the same call: one call layer
    per value, and the plaintext bytes are never bound to a name."""
    aad = head + context
    decrypt = cipher.decrypt
    if version == VERSION_SIV:
        siv_aad = [aad]
        if then is not None:
            return lambda v: then(decrypt(v[HEADER_LEN:], siv_aad))
        return lambda v: decrypt(v[HEADER_LEN:], siv_aad)
    if then is not None:
        return lambda v: then(decrypt(v[HEADER_LEN:_BODY], v[_BODY:], aad))
    return lambda v: decrypt(v[HEADER_LEN:_BODY], v[_BODY:], aad)


def associated_data(version: int, head: bytes, context: bytes) -> tuple[bytes, list[bytes] | None]:
    """The associated data of one key's values in one context, as each
    cipher takes it: AES-GCM's bytes and, for AES-SIV, its one-element list
    (else ``None``). Computed once per key and column (a write lease, a read
    memo entry), not per value, for the per-value code of
    ``columns.fastpath``, which seals ``head + nonce + gcm.encrypt(nonce,
    data, aad)`` or ``head + siv.encrypt(data, siv_aad)`` (the bytes of
    :func:`encrypt_gcm` / :func:`encrypt_siv`) and opens with the same
    slices as :func:`opener`. AES-GCM still draws a fresh ``os.urandom(12)``
    nonce for every value: no buffered or derived nonces, since a buffer
    copied by a ``fork()`` that bypasses ``os.register_at_fork`` (a C-level
    fork, as some pre-forking servers do) or by a VM snapshot would repeat
    nonces under one key."""
    aad = head + context
    return aad, ([aad] if version == VERSION_SIV else None)
