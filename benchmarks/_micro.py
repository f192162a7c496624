"""Per-value cost: the column processors beside a bare AEAD call.

What is timed is what SQLAlchemy calls once per value: each type's bind
processor and result processor for the SQLite dialect (the floor's are
SQLAlchemy's ``TypeDecorator`` wrappers around its ``process_bind_param`` /
``process_result_value``; sa-envelope's are the closures of
``sa_envelope/columns/fastpath.py``), fed the bytes the database returns.

No database round trip is timed: the type is attached to a table (so it
knows its associated data) and its key cache is warm, so what is left is
exactly the per-value path: encode, two dict lookups for the key, header,
nonce, one AEAD call. The bare ``AESGCM``/``AESSIV`` calls (random nonce
included) are the floor of what any AES-GCM column can cost in Python.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from sqlalchemy import Column, MetaData, String, Table

from ._data import dataset
from ._probes import sqlite_probe_manager
from ._rounds import Contender, run_interleaved
from ._settings import Settings
from ._variants import VARIANTS, FloorAesGcm

__all__ = ["run_micro"]


def _pair(encrypt: Callable[[Any], Any], decrypt: Callable[[Any], Any], values: list[Any]) -> tuple[Any, Any]:
    """Timed steps that encrypt every value, and decrypt their ciphertexts."""
    sealed = [bytes(encrypt(v)) for v in values]  # as the database returns them (SQLite binds memoryviews)

    def enc() -> None:
        for v in values:
            encrypt(v)

    def dec() -> None:
        for c in sealed:
            decrypt(c)

    return enc, dec


def _bare_gcm() -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    aead = AESGCM(AESGCM.generate_key(256))

    def enc(data: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + aead.encrypt(nonce, data, None)

    return enc, lambda c: aead.decrypt(c[:12], c[12:], None)


def _bare_siv() -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    siv = AESSIV(AESSIV.generate_key(512))
    return (lambda data: siv.encrypt(data, None)), (lambda c: siv.decrypt(c, None))


def _processors(column_type: Any, dialect: Any) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The type's bind processor and result processor, as SQLAlchemy calls them."""
    bind = column_type._cached_bind_processor(dialect) or (lambda v: v)
    result = column_type._cached_result_processor(dialect, None) or (lambda v: v)
    return bind, result


def _envelope(keys: Any, name: str, texts: list[str], **options: Any) -> tuple[Any, Any, list[Any]]:
    """encrypt, decrypt and the values to encrypt (for row scope, each value
    paired with a row key of its own, made beforehand: one key per row)."""
    from sa_envelope import EncryptedType

    column_type = EncryptedType(String(64), keys, **options)
    table = Table(f"bench_micro_{name}", MetaData(), Column("v", column_type))
    values: list[Any] = texts
    if options.get("scope") == "row":
        with keys.engine.begin() as conn:
            row_keys = keys.new_row_keys(conn, table.name, len(texts) + 1)
        values = [key.value(text) for key, text in zip(row_keys, texts)]
        column_type.decrypt(column_type.encrypt(row_keys[-1].value("warm-up")))
        return (*_processors(column_type, keys.engine.dialect), values)
    column_type.decrypt(column_type.encrypt("warm-up"))  # creates and stores the key
    column_type.decrypt(column_type.encrypt("warm-up"))  # reads it back: now trusted
    return (*_processors(column_type, keys.engine.dialect), values)


def run_micro(settings: Settings) -> dict[str, Any]:
    texts = [row[0] for row in dataset(settings.micro_values)]
    encoded = [t.encode() for t in texts]
    floor = FloorAesGcm()
    pairs: dict[str, tuple[Any, Any, list[Any]]] = {
        "bare AESGCM": (*_bare_gcm(), encoded),
        "bare AESSIV": (*_bare_siv(), encoded),
    }
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as directory:
        keys, engine = sqlite_probe_manager(directory)
        try:
            pairs["floor"] = (*_processors(floor, engine.dialect), texts)
            for name, options in (
                ("sa-envelope table", {}),
                ("sa-envelope row", {"scope": "row"}),
                ("sa-envelope deterministic", {"deterministic": True}),
            ):
                reason = VARIANTS[name].unavailable() if name in VARIANTS else "not registered"
                if reason is None:
                    try:
                        pairs[name] = _envelope(keys, name.split()[-1], texts, **options)
                    except Exception as exc:  # row scope may need a row: report, do not crash
                        reason = f"{type(exc).__name__}: {exc}"
                if reason:
                    unavailable[name] = reason
            contenders = [Contender(n, list(zip(("encrypt", "decrypt"), _pair(e, d, v)))) for n, (e, d, v) in pairs.items()]
            timings = run_interleaved(contenders, rounds=settings.rounds)
        finally:
            engine.dispose()
    per_value = {
        name: {step: 1e6 * (timings.median(name, step) or 0.0) / len(texts) for step in ("encrypt", "decrypt")}
        for name in pairs
    }
    return {"values": len(texts), "timings": timings.as_dict(), "us_per_value": per_value, "unavailable": unavailable}
