"""Row keys read back hold their 32 bytes, not an OpenSSL context each (issue 15)."""

from __future__ import annotations

import os
import pickle
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sa_envelope import CacheLimits
from sa_envelope.envelope.ciphers import RowKeyCipher, current_aead
from sa_envelope.keys.cache import KeyCache


def test_row_key_cipher_seals_and_opens_as_aesgcm() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    lazy = RowKeyCipher(key)
    sealed = lazy.encrypt(nonce, b"value", b"ad")
    assert AESGCM(key).decrypt(nonce, sealed, b"ad") == b"value"
    assert RowKeyCipher(key).decrypt(nonce, AESGCM(key).encrypt(nonce, b"v2", b"ad"), b"ad") == b"v2"


def test_one_aesgcm_object_per_thread_follows_the_key_in_use() -> None:
    a, b = RowKeyCipher(os.urandom(32)), RowKeyCipher(os.urandom(32))
    first = a.aead()
    assert a.aead() is first and current_aead().pair == (a, first)  # a row's other values: the same object
    assert b.aead() is not first and current_aead().pair[0] is b  # the next row's key replaces it
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(current_aead().pair))
    worker.start()
    worker.join()
    assert seen == [(None, None)]  # another thread's slot is its own


def test_a_dead_entry_takes_its_key_out_of_the_slot() -> None:
    cache = KeyCache(CacheLimits())
    one, two = RowKeyCipher(os.urandom(32)), RowKeyCipher(os.urandom(32))
    cache.put_bound([1, 2], [one, two], [b"h1", b"h2"], [None, None])
    one.aead()
    cache.evict_many([1])
    assert current_aead().pair == (None, None)
    two.aead()
    cache.evict(2)
    assert current_aead().pair == (None, None)


def test_row_keys_read_back_count_uses_from_their_first_use() -> None:
    cache = KeyCache(CacheLimits(max_uses=2))
    cache.put_bound([7], [RowKeyCipher(bytes(32))], [b"h"], [b"d" * 32])
    assert [cache.get(7) is not None for _ in range(3)] == [True, True, False]


def test_row_key_cipher_hides_and_refuses_pickling() -> None:
    lazy = RowKeyCipher(b"k" * 32)
    assert "k" * 8 not in repr(lazy)
    with pytest.raises(TypeError):
        pickle.dumps(lazy)
    with pytest.raises(ValueError):
        RowKeyCipher(b"short")
