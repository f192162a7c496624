"""The keyed function that makes a search token: a few C calls per value.

One index's subkey ``S`` (an HMAC-SHA256 object keyed from the table's
blind-index key, :func:`.tokens.derive_context`) gives two keys::

    K_ecb = HMAC-SHA256(S, "sa-envelope search prf\\x00aes-256-ecb")
    K_b2  = HMAC-SHA256(S, "sa-envelope search prf\\x00blake2b")

A token input ``m`` (bytes: an n-gram, a prefix, a bucket, see
docs/format.md) of at most 15 bytes is one AES block, ``m | zero padding |
len(m)`` (the last byte), and its digest is ``AES-256(K_ecb, block)``:
every input of a value goes through one ECB call (a pseudorandom
permutation of distinct blocks, used as a PRF). A longer input's digest is
``BLAKE2b(m, key=K_b2, digest_size=8)``. The two sets of inputs are
disjoint by length, so the pair is one PRF. The token is the digest's first
eight bytes as a signed big-endian integer, shifted right to ``bits``.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from typing import Any, Collection

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["BLOCK_INPUT_MAX", "Prf"]

BLOCK_INPUT_MAX = 15
_LABEL = b"sa-envelope search prf\x00"
_TAILS = [bytes(15 - n) + bytes((n,)) for n in range(16)]
_DIRECT = {8: "b", 16: "h", 32: "i", 64: "q"}  # the top bits, read as they are


@functools.lru_cache(maxsize=256)
def _struct(bits: int, count: int) -> struct.Struct:
    """Reads the first 8 bytes of each 16-byte block (the top ``bits`` when
    ``bits`` is 8, 16, 32 or 64; else the 64 to shift)."""
    code = _DIRECT.get(bits, "q")
    return struct.Struct(">" + f"{code}{16 - struct.calcsize(code)}x" * count)


def _reader(bits: int, count: int) -> Any:
    return _struct(bits, count).unpack


class Prf:
    """The token function of one index under one key (cached with the key)."""

    __slots__ = ("_ecb", "_b2")

    def __init__(self, subkey: Any) -> None:
        self._ecb = Cipher(algorithms.AES(_derive(subkey, b"aes-256-ecb")), modes.ECB())
        self._b2 = _derive(subkey, b"blake2b")

    def tokens(self, inputs: Collection[bytes], bits: int) -> list[int]:
        """The tokens of ``inputs`` (distinct: dedupe first), in no particular
        order. Inputs of one length are packed by one ``join``."""
        by_length: dict[int, list[bytes]] = {}
        lengths = set(map(len, inputs))
        if len(lengths) == 1:
            by_length[lengths.pop()] = list(inputs)
        else:
            for m in inputs:
                by_length.setdefault(len(m), []).append(m)
        out: list[int] = []
        wide: list[int] = []  # 64-bit digests, to shift
        encrypt = self._ecb.encryptor().update
        for length, group in by_length.items():
            if length <= BLOCK_INPUT_MAX:
                tail = _TAILS[length]  # zero padding, then the length byte
                found = _reader(bits, len(group))(encrypt(tail.join(group) + tail))
                (out if bits in _DIRECT else wide).extend(found)
            else:
                for m in group:
                    digest = hashlib.blake2b(m, key=self._b2, digest_size=8).digest()
                    wide.append(int.from_bytes(digest, "big", signed=True))
        shift = 64 - bits
        out.extend([t >> shift for t in wide])
        return out

    def __repr__(self) -> str:
        return "Prf(<hidden>)"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a search Prf holds key material and cannot be pickled")


def _derive(subkey: Any, what: bytes) -> bytes:
    mac = subkey.copy()
    mac.update(_LABEL + what)
    return bytes(mac.digest())
