"""The per-value closures of :class:`~.encrypted.EncryptedType`.

SQLAlchemy calls a column's bind processor once per value and its result
processor once per value read: 60,000 calls for 20,000 rows of three
columns. Whatever can be decided once per statement or once per key is
decided there, not here (profile in benchmarks/README.md):

* **per engine**: each closure serves one bound engine's keys (its
  :class:`~.binds.Via`: store, row keys, read memo), chosen with the dialect.
* **write**: a :class:`~sa_envelope.keys.lease.WriteLease` holds the write
  key and a sealer with the associated data precomputed; it is checked again
  when a statement starts (:mod:`sa_envelope.keys.clock`). Per value: two
  use counters (exact: ``max_uses``, ``max_encryptions``), the codec, a fresh
  ``os.urandom`` nonce and one AEAD call. A deterministic column's lease
  holds its live write key (:mod:`sa_envelope.keys.live`, which follows a
  rotation's two-phase switch), found once per statement the same way.
* **write, row scope**: the row key travels with the value (``RowValue``),
  sealed in one call layer; its ``AESGCM`` object from the thread's
  current-row-key slot (``envelope.ciphers.RowKeyCipher``) once the row's
  first value made it.
* **read, table scope**: the column's read memo maps a value's 9 header
  bytes to an opener with the associated data precomputed; an entry is
  checked again (alive, younger than ``max_age``) when a statement starts.
* **read, row scope**: the row key straight from the row-key cache (which
  :mod:`sa_envelope.rows.prefetch` filled for the statement), its expiry
  compared with the statement's start time; its ``AESGCM`` object from the
  thread's current-row-key slot (``envelope.ciphers.RowKeyCipher``) when the
  row's first value made it.

Anything unusual (no lease, a memo miss, a failure of any kind) takes the
type's own ``encrypt`` / ``decrypt``, which find keys, check every header
field and raise the errors. The closures drop the value from their frame
before an error leaves it (frame locals are what error trackers capture).
"""

from __future__ import annotations

from typing import Any, Callable

from ..envelope import ciphers
from ..envelope import format as fmt
from ..keys import table as kt
from ..keys.clock import CLOCK
from ..keys.lease import WriteLease, live_lease, write_lease
from .binds import Via
from .livematch import Sealed
from .rowvalue import RowValue

__all__ = ["bind_closure", "result_closure"]

_HEADER = fmt.HEADER_SLICE


def _row_bind(coltype: Any, encrypt: Callable[[Any, Any], bytes], store: Any, impl: Any) -> Callable[[Any], Any]:
    """Row scope: each value sealed under the row key paired with it
    (:class:`RowValue`), in one call layer; anything else (a bare value, a
    failure) takes ``encrypt``, which refuses or says why."""
    encode = coltype._codec.fast_encode or coltype._codec.encode
    seal, gcm = fmt.encrypt_gcm, fmt.VERSION_GCM
    slot = ciphers.current_aead()

    def process(value: Any) -> Any:
        if value is None:
            return None
        if type(value) is RowValue:
            key = value.key
            c, head = key.cipher, key.head
            if c is not None and head[0] == gcm:
                try:  # the row key's AESGCM object from the thread's slot, if the row's first value made it
                    pair = slot.pair
                    sealed = seal(pair[1] if pair[0] is c else c.aead(), head, encode(value.value), coltype._ctx)
                    return sealed if impl is None else impl(sealed)
                except Exception:
                    pass  # the full path below says why, from a frame without the value
        try:
            sealed = encrypt(value, store)
        except BaseException:
            value = None
            raise
        return sealed if impl is None else impl(sealed)

    return process


_STALE: tuple[Any, ...] = (-1, None, None, None, None, 0, None, b"", b"", None)


def bind_closure(coltype: Any, impl: Any, via: Via) -> Callable[[Any], Any]:
    """The bind processor of ``coltype`` on ``via``'s engine; ``impl``: the
    storage type's own, or ``None``."""
    encrypt, store = coltype.encrypt, via.store
    if coltype.scope == kt.SCOPE_ROW:  # the key travels with the value
        return _row_bind(coltype, encrypt, store, impl)
    encode = coltype._codec.fast_encode or coltype._codec.encode
    scope, clock, new_nonce = coltype._key_scope, CLOCK, fmt.new_nonce
    max_uses = store.cache.limits.max_uses
    gcm = not coltype.deterministic
    if coltype.deterministic:  # the write key follows a rotation's two-phase switch (keys.live)
        live = coltype.keys.live_for(store)

        def lease_of(table: str, old: WriteLease | None) -> WriteLease | None:
            return live_lease(live, table, scope, coltype._ctx, old)

    else:

        def lease_of(table: str, old: WriteLease | None) -> WriteLease | None:
            return write_lease(store, table, scope, coltype._ctx, old)

    # what the statement's lease says, unpacked once per statement into one
    # tuple (replaced whole, so a thread never mixes two leases' parts):
    # (epoch, lease, entry, uses, budget, limit, cipher's encrypt, aad, head, siv aad)
    current: list[tuple[Any, ...]] = [_STALE]

    def renew() -> tuple[Any, ...]:
        """A new statement (or no lease yet): the lease renewed or replaced."""
        table = coltype._table
        lease = None if table is None else lease_of(table, current[0][1])
        state = _unpacked(lease, gcm)
        current[0] = state
        return state

    def process(value: Any) -> Any:
        if value is None:
            return None
        state = current[0]
        if state[0] != clock.epoch:  # once per statement
            state = renew()
        _, lease, entry, uses, budget, limit, seal, aad, head, siv_aad = state
        if (
            lease is not None
            and type(value) is not Sealed  # a query value under one live key of its own (livematch)
            and entry.alive
            and uses() < max_uses
            and (budget is None or budget() < limit)
        ):
            try:  # fmt.sealer's bytes, inlined: no call layer per value
                if siv_aad is None:
                    nonce = new_nonce()
                    sealed = head + nonce + seal(nonce, encode(value), aad)
                else:
                    sealed = head + seal(encode(value), siv_aad)
                return sealed if impl is None else impl(sealed)
            except Exception:
                pass  # the full path below says why, from a frame without the value
        try:
            sealed = encrypt(value, store)
        except BaseException:
            value = None
            raise
        return sealed if impl is None else impl(sealed)

    return process


def _unpacked(lease: WriteLease | None, gcm: bool) -> tuple[Any, ...]:
    """A lease as the per-value path reads it; :data:`_STALE` (renewed at
    the next value) when there is none or its key's algorithm is not the
    column's (then every value takes the full path, which says why)."""
    if lease is None:
        return _STALE
    entry = lease.entry
    version = entry.head[0]
    if version != (fmt.VERSION_GCM if gcm else fmt.VERSION_SIV):
        return _STALE
    aad, siv_aad = fmt.associated_data(version, entry.head, lease.context)
    budget = None if lease.budget is None else lease.budget.__next__
    return (
        lease.epoch,
        lease,
        entry,
        lease.uses.__next__,
        budget,
        lease.limit,
        entry.cipher.encrypt,
        aad,
        entry.head,
        siv_aad,
    )


def result_closure(coltype: Any, impl: Any, via: Via) -> Callable[[Any], Any]:
    """The result processor of ``coltype`` on ``via``'s engine; ``impl``: the
    storage type's own, or ``None``."""
    decrypt, decode, clock = coltype.decrypt, coltype._codec.decode, CLOCK
    if coltype.scope == kt.SCOPE_ROW:
        if via.binding.rows is None:  # row keys not wired for this engine: decrypt says why
            return _plain_result(decrypt, via, impl)
        return _row_result(coltype, decrypt, decode, impl, via)
    # header -> [opener, epoch, cached key, its decrypt, associated data, AES-SIV?],
    # shared with decrypt() (EncryptedType._remember)
    memo = via.memo
    siv_body, nonce, gcm_body = fmt.SIV_BODY_START, fmt.NONCE_SLICE, fmt.GCM_BODY_START

    def process(value: Any) -> Any:
        if impl is not None:
            value = impl(value)
        if value is None:
            return None
        try:
            hit = memo.get(value[_HEADER])
        except TypeError:  # an unhashable bytes-like value (memoryview): the full path copies it
            hit = None
        if hit is not None and (hit[1] == clock.epoch or _renew(hit)):
            try:  # the opener's call, inlined: no call layer per value
                if hit[5]:
                    return decode(hit[3](value[siv_body:], hit[4]))
                return decode(hit[3](value[nonce], value[gcm_body:], hit[4]))
            except Exception:
                pass
        return decrypt(value, via)

    return process


def _plain_result(decrypt: Callable[[Any, Any], Any], via: Via, impl: Any) -> Callable[[Any], Any]:
    def process(value: Any) -> Any:
        if impl is not None:
            value = impl(value)
        return None if value is None else decrypt(value, via)

    return process


def _renew(hit: list[Any]) -> bool:
    """A read-memo entry met in a new statement: still alive and fresh?"""
    entry = hit[2]
    if entry.alive and entry.expires > CLOCK.now:
        hit[1] = CLOCK.epoch
        return True
    return False


def _row_result(coltype: Any, decrypt: Any, decode: Any, impl: Any, via: Via) -> Callable[[Any], Any]:
    """Row scope: one key per row, read from the row-key cache as it stands.
    The AES-GCM open is inlined (:func:`fmt.decrypt_gcm`'s bytes, no call
    layers): a value too short or altered raises in the cipher, and the full
    path below says why. A row key read back is a ``RowKeyCipher``: the
    row's first value makes its ``AESGCM`` object the thread's current one,
    the row's other values take it from the slot (no Python call layer)."""
    entries, clock, gcm = via.binding.rows.cache._entries, CLOCK, fmt.VERSION_GCM
    slot = ciphers.current_aead()
    id_slice, head_slice, nonce_slice, body = fmt.KEY_ID_SLICE, _HEADER, fmt.NONCE_SLICE, fmt.GCM_BODY_START
    from_bytes = int.from_bytes

    def process(value: Any) -> Any:
        if impl is not None:
            value = impl(value)
        if value is None:
            return None
        try:
            entry = entries.get(from_bytes(value[id_slice], "big"))
            if entry is not None and (c := entry.cipher) is not None and entry.expires > clock.now and value[0] == gcm:
                pair = slot.pair
                aead = pair[1] if pair[0] is c else c.aead()  # RowKeyCipher: made current here
                return decode(aead.decrypt(value[nonce_slice], value[body:], value[head_slice] + coltype._ctx))
        except Exception:
            pass
        return decrypt(value, via)

    return process
