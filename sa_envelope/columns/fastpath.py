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
  sealed in one call layer.
* **read, table scope**: the column's read memo maps a value's 9 header
  bytes to an opener with the associated data precomputed; an entry is
  checked again (alive, younger than ``max_age``) when a statement starts.
* **read, row scope**: the row key straight from the row-key cache (which
  :mod:`sa_envelope.rows.prefetch` filled for the statement), its expiry
  compared with the statement's start time.

Anything unusual (no lease, a memo miss, a failure of any kind) takes the
type's own ``encrypt`` / ``decrypt``, which find keys, check every header
field and raise the errors. The closures drop the value from their frame
before an error leaves it (frame locals are what error trackers capture).
"""

from __future__ import annotations

from typing import Any, Callable

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

    def process(value: Any) -> Any:
        if value is None:
            return None
        if type(value) is RowValue:
            key = value.key
            if key.cipher is not None and key.head[0] == gcm:
                try:
                    sealed = seal(key.cipher, key.head, encode(value.value), coltype._ctx)
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


def bind_closure(coltype: Any, impl: Any, via: Via) -> Callable[[Any], Any]:
    """The bind processor of ``coltype`` on ``via``'s engine; ``impl``: the
    storage type's own, or ``None``."""
    encrypt, store = coltype.encrypt, via.store
    if coltype.scope == kt.SCOPE_ROW:  # the key travels with the value
        return _row_bind(coltype, encrypt, store, impl)
    encode = coltype._codec.fast_encode or coltype._codec.encode
    scope, clock = coltype._key_scope, CLOCK
    max_uses = store.cache.limits.max_uses
    current: list[WriteLease | None] = [None]
    if coltype.deterministic:  # the write key follows a rotation's two-phase switch (keys.live)
        live = coltype.keys.live_for(store)

        def lease_of(table: str, old: WriteLease | None) -> WriteLease | None:
            return live_lease(live, table, scope, coltype._ctx, encode, old)

    else:

        def lease_of(table: str, old: WriteLease | None) -> WriteLease | None:
            return write_lease(store, table, scope, coltype._ctx, encode, old)

    def process(value: Any) -> Any:
        if value is None:
            return None
        lease = current[0]
        if lease is None or lease.epoch != clock.epoch:  # once per statement
            table = coltype._table
            lease = current[0] = None if table is None else lease_of(table, lease)
        if type(value) is Sealed:  # a query value under one live key of its own (livematch)
            lease = None
        if (
            lease is not None
            and lease.entry.alive
            and next(lease.uses) < max_uses
            and (lease.budget is None or next(lease.budget) < lease.limit)
        ):
            try:
                sealed = lease.seal(value)
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


def result_closure(coltype: Any, impl: Any, via: Via) -> Callable[[Any], Any]:
    """The result processor of ``coltype`` on ``via``'s engine; ``impl``: the
    storage type's own, or ``None``."""
    decrypt, decode, clock = coltype.decrypt, coltype._codec.decode, CLOCK
    if coltype.scope == kt.SCOPE_ROW:
        if via.binding.rows is None:  # row keys not wired for this engine: decrypt says why
            return _plain_result(decrypt, via, impl)
        return _row_result(coltype, decrypt, decode, impl, via)
    memo = via.memo  # header -> [opener+decoder, epoch, cached key], shared with decrypt()

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
            try:
                return hit[0](value)  # opens and decodes
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
    path below says why."""
    entries, clock, gcm = via.binding.rows.cache._entries, CLOCK, fmt.VERSION_GCM
    id_slice, head_slice, nonce_slice, body = fmt.KEY_ID_SLICE, _HEADER, fmt.NONCE_SLICE, fmt.GCM_BODY_START
    from_bytes = int.from_bytes

    def process(value: Any) -> Any:
        if impl is not None:
            value = impl(value)
        if value is None:
            return None
        try:
            entry = entries.get(from_bytes(value[id_slice], "big"))
            if entry is not None and entry.cipher is not None and entry.expires > clock.now and value[0] == gcm:
                return decode(entry.cipher.decrypt(value[nonce_slice], value[body:], value[head_slice] + coltype._ctx))
        except Exception:
            pass
        return decrypt(value, via)

    return process
