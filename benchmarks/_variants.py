"""The variant registry: every way of storing the three columns we compare.

A variant says how to type the three benchmark columns (email, SSN, notes)
and how to *touch* a loaded value (for lazy peers, touching means
decrypting). Variants whose feature has not landed yet say so through
``probe``: the harness then reports "n/a (not available: reason)" instead
of crashing, and picks the variant up unchanged once the feature exists.
Register a new variant with :func:`register`.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import LargeBinary, String
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = [
    "COLUMNS",
    "FloorAesGcm",
    "NotAvailable",
    "VARIANTS",
    "Variant",
    "register",
    "select_variants",
]

# column name -> declared length of the plaintext String
COLUMNS = {"email": 64, "ssn": 11, "notes": 255}
FIXED_KEY = bytes(range(32))  # the floor and the peers use a fixed key: no envelope


class NotAvailable(Exception):
    """The variant's feature or package is missing; the message says why."""


class FloorAesGcm(TypeDecorator[str]):
    """The floor: the least an AES-GCM column can do. Fixed key, random
    nonce, no associated data, no header, no key management."""

    impl = LargeBinary
    cache_ok = True
    _aead = AESGCM(FIXED_KEY)

    def process_bind_param(self, value: Any, dialect: Any) -> bytes | None:
        if value is None:
            return None
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value.encode(), None)

    def process_result_value(self, value: Any, dialect: Any) -> str | None:
        if value is None:
            return None
        value = bytes(value)
        return self._aead.decrypt(value[:12], value[12:], None).decode()


TypeFactory = Callable[[int, Any], TypeEngine[Any]]  # (plaintext length, KeyManager) -> type


@dataclass(frozen=True)
class Variant:
    """One contender. ``column_type`` builds a fresh type per column."""

    name: str
    kind: str  # "baseline", "peer" or "sa-envelope"
    column_type: TypeFactory
    touch: Callable[[Any], Any] = lambda value: value
    uses_keys: bool = False  # needs a KeyManager (and so counts KMS calls)
    probe: Callable[[], str | None] = lambda: None  # reason it is unavailable, or None
    scope: str = ""  # sa-envelope scope shown in reports ("table", "row", "deterministic")
    # Why ``WHERE col IN (...)`` cannot find a value (empty: it can). A random
    # nonce makes equal plaintexts differ, so only plaintext and deterministic
    # columns take part in the Core lookup.
    no_equality: str = "random nonce: equal plaintexts give different bytes (needs a blind-index column)"
    # The inserts give the primary keys (1..N) instead of letting the database
    # make them: row keys are then bound as they are made, with no RETURNING.
    ids_given: bool = False

    def unavailable(self) -> str | None:
        try:
            return self.probe()
        except Exception as exc:  # a probe must never take the run down
            return f"probe failed: {type(exc).__name__}: {exc}"

    def types(self, keys: Any) -> dict[str, TypeEngine[Any]]:
        return {name: self.column_type(length, keys) for name, length in COLUMNS.items()}


VARIANTS: dict[str, Variant] = {}


def register(variant: Variant) -> Variant:
    VARIANTS[variant.name] = variant
    return variant


def select_variants(names: list[str] | None = None) -> list[Variant]:
    if not names:
        return list(VARIANTS.values())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    return [VARIANTS[n] for n in names]


# -- peers ----------------------------------------------------------------------------


def _import_reason(module: str, extra: str = "bench") -> str | None:
    try:
        __import__(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc}); pip install -e '.[{extra}]'"
    return None


def _utils_type(length: int, keys: Any) -> TypeEngine[Any]:
    from sqlalchemy_utils import StringEncryptedType
    from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine

    # base64 of nonce + ciphertext + tag: room for 4/3 of (length*4 + 28)
    return StringEncryptedType(String(length), FIXED_KEY.hex(), AesGcmEngine, length=length * 6 + 64)


def _sef_type(length: int, keys: Any) -> TypeEngine[Any]:
    import sqlalchemy_encrypted_field as sef

    _configure_sef()
    return sef.EncryptedText()


@lru_cache(maxsize=None)
def _configure_sef() -> None:
    import sqlalchemy_encrypted_field as sef

    sef.configure(base64.b64encode(FIXED_KEY).decode())


def _sef_touch(value: Any) -> Any:
    return value.decrypt()  # lazy Secret: the plaintext exists only once asked for


def _sealed_type(length: int, keys: Any) -> TypeEngine[Any]:
    from sealed_fields.sqlalchemy import SealedText

    # The package's README: one SealedFields per process, SealedText for
    # columns (SealedString needs a length sized for the ciphertext).
    return SealedText(_sealed_fields())


@lru_cache(maxsize=None)
def _sealed_fields() -> Any:
    from sealed_fields import create_sealed_fields

    key = base64.urlsafe_b64encode(FIXED_KEY).decode().rstrip("=")
    return create_sealed_fields(namespaces={"PII": {"key": key}}, default_namespace="PII")


def _pydantic_type(length: int, keys: Any) -> TypeEngine[Any]:
    from pydantic_encryption import SQLAlchemyEncryptedValue

    _configure_pydantic_fernet()
    return SQLAlchemyEncryptedValue()


@lru_cache(maxsize=None)
def _configure_pydantic_fernet() -> None:
    """The README's "Fernet Setup" (``ENCRYPTION_METHOD=fernet``, ``ENCRYPTION_KEY``),
    set on the settings object the package reads those variables into."""
    from pydantic_encryption.config import settings
    from pydantic_encryption.types import EncryptionMethod

    settings.ENCRYPTION_METHOD = EncryptionMethod.FERNET
    settings.ENCRYPTION_KEY = base64.urlsafe_b64encode(FIXED_KEY).decode()


PYDANTIC_KMS_REASON = (
    "its AWS mode makes one KMS GenerateDataKey per value written and one KMS Decrypt per value read "
    "(pydantic_encryption/adapters/encryption/aws.py: no data-key cache), i.e. 3 KMS round trips per row "
    "here; with a real KMS that is network latency per value, not comparable with local-key columns, "
    "and it needs aioboto3 (pydantic-encryption[aws]). Its local-key mode (Fernet) is measured instead"
)


# -- sa-envelope ------------------------------------------------------------------------


def _envelope_type(**options: Any) -> TypeFactory:
    def make(length: int, keys: Any) -> TypeEngine[Any]:
        from sa_envelope import EncryptedType

        return EncryptedType(String(length), keys, **options)

    return make


@lru_cache(maxsize=None)
def _row_scope_missing() -> str | None:
    """Row scope exists when an ORM insert of scope='row' values writes row keys."""
    from ._probes import probe_row_scope

    return probe_row_scope()


register(Variant("plaintext", "baseline", lambda length, keys: String(length), no_equality=""))
register(Variant("floor", "baseline", lambda length, keys: FloorAesGcm()))
register(Variant("floor (again)", "baseline", lambda length, keys: FloorAesGcm()))
register(Variant(
    "sqlalchemy-utils AesGcmEngine", "peer", _utils_type,
    probe=lambda: _import_reason("sqlalchemy_utils"),
))
register(Variant(
    "sqlalchemy-encrypted-field", "peer", _sef_type, touch=_sef_touch,
    probe=lambda: _import_reason("sqlalchemy_encrypted_field"),
))
register(Variant(
    "sealed-fields SealedText", "peer", _sealed_type, probe=lambda: _import_reason("sealed_fields"),
))
register(Variant(
    "pydantic-encryption Fernet", "peer", _pydantic_type,
    probe=lambda: _import_reason("pydantic_encryption.integrations.sqlalchemy"),
))
register(Variant(
    "pydantic-encryption AWS KMS", "peer", _pydantic_type, probe=lambda: PYDANTIC_KMS_REASON,
))
register(Variant("sa-envelope table", "sa-envelope", _envelope_type(), uses_keys=True, scope="table"))
register(Variant(
    "sa-envelope row", "sa-envelope", _envelope_type(scope="row"), uses_keys=True,
    probe=_row_scope_missing, scope="row",
    no_equality="row scope: every row has its own key, so equal plaintexts differ",
))
register(Variant(
    "sa-envelope row, ids given", "sa-envelope", _envelope_type(scope="row"), uses_keys=True,
    probe=_row_scope_missing, scope="row", ids_given=True,
    no_equality="row scope: every row has its own key, so equal plaintexts differ",
))
register(Variant(
    "sa-envelope deterministic", "sa-envelope", _envelope_type(deterministic=True),
    uses_keys=True, scope="deterministic", no_equality="",
))
