"""The stored format, byte by byte: known-answer vectors and its limits.

The vectors in vectors/format.json pin the format: a change to the layout,
the associated data or the header breaks them. Each vector is also rebuilt
here from the layout written in docs/format.md with bare ``cryptography``
calls, so the document and the code cannot drift apart.
"""

from __future__ import annotations

import json
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from sa_envelope.envelope import format as fmt
from support import TESTS

VECTORS = json.loads((TESTS / "vectors" / "format.json").read_text())["vectors"]


def _aad_from_docs(version: int, key_id: int, table: str, column: str) -> bytes:
    """Associated data exactly as docs/format.md describes it."""
    head = bytes([version]) + struct.pack(">Q", key_id)
    t, c = table.encode(), column.encode()
    return head + struct.pack(">H", len(t)) + t + struct.pack(">H", len(c)) + c


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['mode']}-{v['table']}-{len(v['plaintext'])//2}")
def test_known_answer_vector(vector: dict) -> None:
    key = bytes.fromhex(vector["key"])
    key_id = fmt.parse_key_id(vector["key_id"])
    stored = bytes.fromhex(vector["stored"])
    plaintext = bytes.fromhex(vector["plaintext"])
    ctx = fmt.context_bytes(vector["table"], vector["column"])
    assert ctx.hex() == vector["context"]
    if vector["mode"] == "gcm":
        nonce = bytes.fromhex(vector["nonce"])
        aad = _aad_from_docs(1, key_id, vector["table"], vector["column"])
        by_hand = aad[:9] + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)
        assert by_hand == stored
        head = fmt.header(fmt.VERSION_GCM, key_id)
        assert fmt.encrypt_gcm(AESGCM(key), head, plaintext, ctx, nonce) == stored
        assert fmt.decrypt_gcm(AESGCM(key), stored, ctx) == plaintext
        assert len(stored) - len(plaintext) == fmt.GCM_OVERHEAD
    else:
        aad = _aad_from_docs(2, key_id, vector["table"], vector["column"])
        by_hand = aad[:9] + AESSIV(key).encrypt(plaintext, [aad])
        assert by_hand == stored
        head = fmt.header(fmt.VERSION_SIV, key_id)
        assert fmt.encrypt_siv(AESSIV(key), head, plaintext, ctx) == stored
        assert fmt.decrypt_siv(AESSIV(key), stored, ctx) == plaintext
        assert len(stored) - len(plaintext) == fmt.SIV_OVERHEAD
    assert fmt.read_header(stored) == ({"gcm": 1, "siv": 2}[vector["mode"]], key_id)


def test_overhead_is_within_40_bytes() -> None:
    assert fmt.GCM_OVERHEAD == 37 and fmt.SIV_OVERHEAD == 25
    assert max(fmt.GCM_OVERHEAD, fmt.SIV_OVERHEAD) <= 40


def test_fresh_nonce_per_value() -> None:
    aead = AESGCM(bytes(32))
    head = fmt.header(fmt.VERSION_GCM, 7)
    values = {fmt.encrypt_gcm(aead, head, b"same", b"ctx") for _ in range(200)}
    assert len(values) == 200
    nonces = {v[9:21] for v in values}
    assert len(nonces) == 200


def test_context_encoding_is_unambiguous() -> None:
    assert fmt.context_bytes("a.b", "c") != fmt.context_bytes("a", "b.c")
    assert fmt.context_bytes("ab", "c") != fmt.context_bytes("a", "bc")


@pytest.mark.parametrize(
    "value",
    [b"", b"\x01", b"\x01" + bytes(7), b"\x03" + bytes(40), b"garbage bytes that are long enough to parse"],
)
def test_malformed_headers_raise_the_format_error(value: bytes) -> None:
    with pytest.raises(fmt.InvalidEnvelope):
        fmt.read_header(value)


def test_short_or_tampered_bodies_raise_the_format_error() -> None:
    aead = AESGCM(bytes(32))
    head = fmt.header(fmt.VERSION_GCM, 9)
    good = fmt.encrypt_gcm(aead, head, b"secret", b"ctx")
    for bad in (good[:-1], good[: fmt.GCM_OVERHEAD - 1], good + b"\x00", good[:30] + bytes([good[30] ^ 1]) + good[31:]):
        with pytest.raises(fmt.InvalidEnvelope):
            fmt.decrypt_gcm(aead, bad, b"ctx")
    with pytest.raises(fmt.InvalidEnvelope):
        fmt.decrypt_gcm(aead, good, b"other ctx")


def test_key_id_text_round_trip() -> None:
    assert fmt.format_key_id(1) == "0000000000000001"
    assert fmt.parse_key_id("7fffffffffffffff") == (1 << 63) - 1
    with pytest.raises(ValueError):
        fmt.parse_key_id("0")
