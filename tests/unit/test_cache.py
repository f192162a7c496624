"""The plaintext key cache on its own: size, age and use limits (no database)."""

from __future__ import annotations


from sa_envelope import CacheLimits
from sa_envelope.keys.cache import KeyCache


def test_cache_unit_limits() -> None:
    cache = KeyCache(CacheLimits(max_size=2, max_age=60, max_uses=3))
    for key_id in (1, 2, 3):
        cache.put(key_id, object(), b"h")
    assert cache.get(1) is None and len(cache) == 2  # oldest evicted
    assert [cache.get(2) is not None for _ in range(4)] == [True, True, True, False]
    assert "CachedKey(0000000000000003)" == repr(cache.get(3))
