"""The algorithms a data key can have, and the local wrap of row keys.

:data:`ALGORITHMS` is the one table from an algorithm's name (as stored in
the key table) to its cipher class, key size and value-format version.
:class:`HmacKey` is the "cipher" of a blind-index key. Row keys are wrapped
here, locally, by their table key: ``os.urandom(32)`` sealed with
AES-256-GCM, with associated data binding the row key id, the table key id
and the owner table (:func:`row_key_ad`). Stored form (``wrapped_key``)::

    02 | nonce (12) | AES-256-GCM(row key) | tag (16)

    associated data: b"sa-envelope row key\\x00" | row key id (8, big-endian)
                     | table key id (8, big-endian) | row digest (32) | owner table (UTF-8)

Version 2 binds the key to its row: the row digest (the key table's
``row_digest`` column, a keyed digest of the row's table and primary key,
see :mod:`sa_envelope.rows.binding`) is authenticated, so a key row cannot
be relabelled to another row. Version 1 (no digest in the associated data,
``row_digest`` NULL) is still read: keys made before rows were bound, or by
the Core API without a primary key.

Like :mod:`.format`, this module knows nothing of SQLAlchemy; its only
error is :class:`~.format.InvalidEnvelope`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from typing import Any, Callable, Mapping, NoReturn, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from . import format as fmt

__all__ = [
    "ALGORITHMS",
    "HmacKey",
    "ROW_KEY_ALGORITHM",
    "ROW_KEY_CIPHER",
    "RowKeyCipher",
    "current_aead",
    "open_many",
    "open_row_key",
    "row_key_ad",
    "row_key_opener",
    "wrap_many",
    "wrap_row_key",
    "wrap_row_keys",
]

ROW_KEY_ALGORITHM = "AES-256-GCM"
ROW_KEY_CIPHER = AESGCM  # what a row key's values are sealed with (through RowKeyCipher's per-thread slot)
ROW_KEY_BYTES = 32
ROW_WRAP_VERSION = 0x01  # unbound: no row digest in the associated data
ROW_WRAP_BOUND = 0x02  # bound to its row: the digest is in the associated data
ROW_DIGEST_LEN = 32
WRAPPED_ROW_KEY_LEN = 1 + fmt.NONCE_LEN + ROW_KEY_BYTES + fmt.TAG_LEN
_AD_LABEL = b"sa-envelope row key\x00"
_WRAP_BYTE = bytes((ROW_WRAP_VERSION,))
_BOUND_BYTE = bytes((ROW_WRAP_BOUND,))
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


class _Current(threading.local):
    """Per thread: the row key last used and its ``AESGCM`` object."""

    def __init__(self) -> None:
        self.pair: tuple[Any, Any] = (None, None)


_CURRENT = _Current()


def current_aead() -> _Current:
    """The per-thread slot :class:`RowKeyCipher` keeps its cipher in: its
    ``pair`` is ``(RowKeyCipher, AESGCM)`` of the row key this thread used
    last (``columns.fastpath`` reads it inline: no Python call per value)."""
    return _CURRENT


class RowKeyCipher:
    """AES-256-GCM under one row key (made for an INSERT, or read back from
    the key table), whose ``AESGCM`` object is built when the key is used,
    not when it is cached.

    Why: an ``AESGCM`` object holds about 2.5 KB of OpenSSL state from its
    construction on; a stream caches a partition's row keys (10,000 for
    ``yield_per=10_000``), and one object per cached key was 25 MiB more RSS
    than a table-scope stream. A key read back holds the 32 bytes and
    nothing else; the ``AESGCM`` object of the key a thread used last is
    kept in a per-thread slot (:func:`current_aead`). A row's values are
    opened one after the other with the row's key: one construction per
    row, and one OpenSSL context per thread instead of one per cached key.
    The slot is emptied when the key's cache entry dies (:meth:`release`,
    from that thread) or replaced at the thread's next row key: a key
    outlives its cache entry in at most one slot per thread.

    A key made for an INSERT (``keep=True``) keeps the object its first use
    built (sealing its row's values): the process that wrote the rows
    usually reads them back (an ORM load after the commit), and building
    one per row again made that warm read 1.2-1.3x slower; the key was
    built once either way. Same ``encrypt``/``decrypt`` signature as ``AESGCM``."""

    __slots__ = ("_key", "_keep", "_kept")

    def __init__(self, key: bytes, *, keep: bool = False) -> None:
        if len(key) != ROW_KEY_BYTES:
            raise ValueError("a row key is 32 bytes")
        self._key = key
        self._keep = keep
        self._kept: AESGCM | None = None

    def aead(self) -> AESGCM:
        """This key's ``AESGCM`` object: the kept one, the thread's current
        one, or a new one made current (and kept, for a key made here)."""
        kept = self._kept
        if kept is not None:
            return kept
        pair = _CURRENT.pair
        if pair[0] is self:
            return pair[1]  # type: ignore[no-any-return]
        aead = AESGCM(self._key)
        _CURRENT.pair = (self, aead)
        if self._keep:
            self._kept = aead
        return aead

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self.aead().encrypt(nonce, data, associated_data)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self.aead().decrypt(nonce, data, associated_data)

    @property
    def material(self) -> bytes:
        """The 32 bytes: for the wrap of a key made before its row was known
        (``RowKeys.bind``), so the cache entry holds no second copy."""
        return self._key

    def release(self) -> None:
        """Called when the key's cache entry dies: this thread's slot forgets it."""
        if _CURRENT.pair[0] is self:
            _CURRENT.pair = (None, None)

    def __repr__(self) -> str:
        return "RowKeyCipher(<hidden>)"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a RowKeyCipher holds key material and cannot be pickled")


ALGORITHMS: Mapping[str, tuple[type, int, int]] = {
    # name: (cipher class, key bytes, format version)
    "AES-256-GCM": (AESGCM, 32, fmt.VERSION_GCM),
    "AES-256-SIV": (AESSIV, 64, fmt.VERSION_SIV),
    "HMAC-SHA256": (HmacKey, 32, 0),  # blind indexes: no stored envelope, no version
}


def row_key_ad(key_id: int, parent_id: int, owner: str, digest: bytes | None = None) -> bytes:
    """Associated data of a wrapped row key: it unwraps only as this key,
    under this parent, for this table, and (version 2) for this row. The
    digest has a fixed length and the owner comes last: unambiguous."""
    bound = b"" if digest is None else digest
    return _AD_LABEL + fmt.key_id_bytes(key_id) + fmt.key_id_bytes(parent_id) + bound + owner.encode("utf-8")


def wrap_row_key(
    parent: AESGCM, parent_id: int, owner: str, key_id: int, plain: bytes, digest: bytes | None = None
) -> bytes:
    """One row key's wrap: version 2, bound to the row ``digest`` names, or
    version 1 without a digest (:func:`wrap_many` of one key)."""
    return wrap_many(parent, parent_id, owner, [key_id], [plain], [digest])[0]


def wrap_many(
    parent: AESGCM,
    parent_id: int,
    owner: str,
    key_ids: Sequence[int],
    plains: Sequence[bytes],
    digests: Sequence[bytes | None],
) -> list[bytes]:
    """The wraps of row keys (parallel sequences: key id, material, row
    digest or None) under one table key: the one place the wrap is made.
    Version 2 where a digest is given, version 1 without.

    Runs once per new row key (20,000 times for an executemany of 20,000
    rows): one ``os.urandom`` call gives every nonce (each used once, taken
    within this call, so no buffer outlives it), the table key's and the
    owner's parts of the associated data are built once; parallel sequences,
    not a tuple per key (20,000 more objects for the garbage collector).
    """
    nonces = os.urandom(fmt.NONCE_LEN * len(key_ids))
    parent_part = fmt.key_id_bytes(parent_id)
    owner_part = owner.encode("utf-8")
    seal, n, label, id_len = parent.encrypt, fmt.NONCE_LEN, _AD_LABEL, fmt.KEY_ID_LEN
    out: list[bytes] = []
    add = out.append
    for i, key_id in enumerate(key_ids):
        nonce = nonces[i * n : (i + 1) * n]
        digest = digests[i]
        if digest is None:
            ad = label + key_id.to_bytes(id_len, "big") + parent_part + owner_part
            add(_WRAP_BYTE + nonce + seal(nonce, plains[i], ad))
        else:
            if len(digest) != ROW_DIGEST_LEN:
                raise ValueError("a row digest is 32 bytes")
            ad = label + key_id.to_bytes(id_len, "big") + parent_part + digest + owner_part
            add(_BOUND_BYTE + nonce + seal(nonce, plains[i], ad))
    return out


def wrap_row_keys(
    parent: AESGCM,
    parent_id: int,
    owner: str,
    key_ids: list[int],
    digests: list[bytes | None],
    wrap: list[bool] | None = None,
) -> tuple[list[bytes | None], list[RowKeyCipher]]:
    """Fresh row keys for ``key_ids``: their wrapped bytes and their
    :class:`RowKeyCipher` objects (parallel lists); bound (version 2) where
    ``digests`` gives the row's digest; not wrapped yet (``None``) where
    ``wrap`` says so (the caller wraps it once the row is known:
    ``RowKeys.bind``, from :attr:`RowKeyCipher.material`).

    Runs once per new row (20,000 times for 20,000 rows): one ``os.urandom``
    call for all the material, the wraps made by :func:`wrap_many` in one
    call, no tuple per key. A key's ``AESGCM`` object is made when its
    values are sealed, and kept for reading them back (:class:`RowKeyCipher`).
    """
    count, size = len(key_ids), ROW_KEY_BYTES
    material = os.urandom(size * count)
    plains = [material[i * size : (i + 1) * size] for i in range(count)]
    if wrap is None:
        wrapped: list[bytes | None] = list(wrap_many(parent, parent_id, owner, key_ids, plains, digests))
    else:
        wanted = [i for i in range(count) if wrap[i]]
        wrapped = [None] * count
        made = wrap_many(
            parent,
            parent_id,
            owner,
            [key_ids[i] for i in wanted],
            [plains[i] for i in wanted],
            [digests[i] for i in wanted],
        )
        for i, w in zip(wanted, made):
            wrapped[i] = w
    cipher = RowKeyCipher
    return wrapped, [cipher(p, keep=True) for p in plains]


def open_row_key(
    parent: Any, parent_version: int, key_id: int, parent_id: int, owner: str, wrapped: Any, digest: bytes | None = None
) -> bytes:
    """One wrapped row key opened (format in the module docstring): see :func:`row_key_opener`."""
    return row_key_opener(parent, parent_version, parent_id, owner)(key_id, wrapped, digest)


def row_key_opener(parent: Any, parent_version: int, parent_id: int, owner: str) -> Callable[[int, Any, Any], bytes]:
    """The one place wrapped row keys are opened: a function of ``(key id,
    wrapped, digest)`` for the row keys of ``owner`` under one table key,
    with that key's part of the associated data computed once (a cold read
    of 20,000 rows opens 20,000 row keys under one or two table keys).

    ``digest`` is the key row's ``row_digest``: version 2 needs it, version 1
    must have none (a digest added to an unbound key row is tampering). A
    tampered row may name a parent that is no AES-GCM table key, or hold
    bytes too short for a nonce: each fails as a bad tag would.
    """
    decrypt = getattr(parent, "decrypt", None)
    parent_part = fmt.key_id_bytes(parent_id)
    owner_part = owner.encode("utf-8")
    usable = parent_version == fmt.VERSION_GCM and decrypt is not None
    nonce_end = 1 + fmt.NONCE_LEN

    def open_one(key_id: int, wrapped: Any, digest: Any) -> bytes:
        if type(wrapped) is not bytes:
            wrapped = bytes(wrapped)
        expected = ROW_WRAP_VERSION if digest is None else ROW_WRAP_BOUND
        if not usable or len(wrapped) != WRAPPED_ROW_KEY_LEN or wrapped[0] != expected:
            raise fmt.InvalidEnvelope("row key does not unwrap under its table key")
        try:
            ad = _AD_LABEL + key_id.to_bytes(fmt.KEY_ID_LEN, "big") + parent_part + (digest or b"") + owner_part
            return bytes(decrypt(wrapped[1:nonce_end], wrapped[nonce_end:], ad))  # type: ignore[misc]
        except (InvalidTag, ValueError, TypeError, OverflowError):
            raise fmt.InvalidEnvelope("row key does not unwrap under its table key") from None

    return open_one


def open_many(parent: Any, parent_version: int, parent_id: int, owner: str, keys: Sequence[Any]) -> list[bytes]:
    """The material of many wrapped row keys of ``owner`` under one table key:
    each item is indexed ``[0]`` key id, ``[1]`` wrapped bytes, ``[2]`` row
    digest or ``None`` (a key-table row read in that column order). The same
    checks as :func:`row_key_opener`, inlined in one loop: a cold read opens
    one row key per row. A key row that does not unwrap raises
    :class:`~.format.InvalidEnvelope` whose ``index`` attribute says which
    item (the caller names its key id); the whole batch fails with it.
    """
    decrypt = getattr(parent, "decrypt", None)
    if parent_version != fmt.VERSION_GCM or decrypt is None:
        _refuse(0)
    prefix, suffix = fmt.key_id_bytes(parent_id), owner.encode("utf-8")
    label, size, end, n = _AD_LABEL, WRAPPED_ROW_KEY_LEN, 1 + fmt.NONCE_LEN, fmt.KEY_ID_LEN
    out: list[bytes] = []
    for i, item in enumerate(keys):
        key_id, wrapped, digest = item[0], item[1], item[2]
        if type(wrapped) is not bytes:
            wrapped = bytes(wrapped)
        if len(wrapped) != size or wrapped[0] != (ROW_WRAP_VERSION if digest is None else ROW_WRAP_BOUND):
            _refuse(i)
        try:
            ad = label + key_id.to_bytes(n, "big") + prefix + (digest or b"") + suffix
            out.append(decrypt(wrapped[1:end], wrapped[end:], ad))
        except (InvalidTag, ValueError, TypeError, OverflowError):
            _refuse(i)
    return out


def _refuse(index: int) -> NoReturn:
    exc = fmt.InvalidEnvelope("row key does not unwrap under its table key")
    exc.index = index  # type: ignore[attr-defined]
    raise exc from None
