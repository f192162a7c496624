"""Known-answer vectors of the search token function (docs/format.md,
"Tokens"), from a fixed subkey: the AES-256-ECB path (inputs of up to 15
bytes, the length in the block's last byte) and the BLAKE2b path (16 bytes
and more), at 64, 32 and 12 bits; a value's inputs packed into one call give
the tokens each gives alone."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sa_envelope.search.prf import Prf

SUBKEY = bytes(range(32))  # HMAC-SHA256 keyed with 00 01 .. 1f stands for an index subkey
VECTORS = [  # input, token at 64, 32 and 12 bits
    (b"abc", -4855693332277434606, -1130554204, -1079),
    (b"", -8364835484681314659, -1947590030, -1858),
    (b"x" * 15, 2561082749048342641, 596298544, 568),
    (b"x" * 16, 6341060614591068269, 1476393224, 1407),
    ("日本語".encode(), 7798229321336418288, 1815666752, 1731),
    (b"\x00" + b"1984", -3685799701112716688, -858167117, -819),
]


def _prf() -> Prf:
    return Prf(hmac.new(SUBKEY, digestmod=hashlib.sha256))


@pytest.mark.parametrize(("m", "t64", "t32", "t12"), VECTORS)
def test_known_answers(m: bytes, t64: int, t32: int, t12: int) -> None:
    prf = _prf()
    assert [prf.tokens([m], bits)[0] for bits in (64, 32, 12)] == [t64, t32, t12]


def test_the_vectors_follow_the_documented_recipe() -> None:
    def key(what: bytes) -> bytes:
        return hmac.new(SUBKEY, b"sa-envelope search prf\x00" + what, hashlib.sha256).digest()

    for m, t64, _, _ in VECTORS:
        if len(m) <= 15:
            block = m + bytes(15 - len(m)) + bytes((len(m),))
            digest = Cipher(algorithms.AES(key(b"aes-256-ecb")), modes.ECB()).encryptor().update(block)[:8]
        else:
            digest = hashlib.blake2b(m, key=key(b"blake2b"), digest_size=8).digest()
        assert int.from_bytes(digest, "big", signed=True) == t64


def test_many_inputs_in_one_call_are_each_alone() -> None:
    prf = _prf()
    inputs = [m for m, *_ in VECTORS] + [b"ab", b"abcd", "é".encode()]
    for bits in (64, 40, 32, 16, 8):
        assert sorted(prf.tokens(inputs, bits)) == sorted(prf.tokens([m], bits)[0] for m in inputs)
    with pytest.raises(TypeError, match="cannot be pickled"):
        __import__("pickle").dumps(prf)
