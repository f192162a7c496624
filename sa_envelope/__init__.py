"""sa-envelope: envelope encryption of SQLAlchemy columns.

Declare a column as ``EncryptedType(String(200), keys)`` and its values are
encrypted in the application with a data key (AES-256-GCM, or AES-SIV for
deterministic columns); data keys are wrapped by a master key held by AWS
KMS or, for development, a local key file. See ``docs/`` for the format, the
threat model and the rotation runbook.
"""

from __future__ import annotations

from ._aws import AwsKmsProvider
from ._blindindex import BlindIndexType, lookup, normalize_email, normalize_phone
from ._cache import CacheLimits
from ._errors import (
    ConfigurationError,
    DecryptionError,
    EncryptionError,
    EnvelopeError,
    KeyNotFoundError,
    KeyProviderError,
    RowKeyRequiredError,
    UnsupportedQueryError,
)
from ._manager import KeyManager
from ._providers import DataKey, KeyProvider, LocalKeyProvider
from ._reencrypt import ReencryptReport
from ._rewrap import RewrapReport
from ._rollover import RolloverPolicy
from ._spec import provider_from_spec
from ._type import EncryptedType

__all__ = [
    "AwsKmsProvider",
    "BlindIndexType",
    "CacheLimits",
    "ConfigurationError",
    "DataKey",
    "DecryptionError",
    "EncryptedType",
    "EncryptionError",
    "EnvelopeError",
    "KeyManager",
    "KeyNotFoundError",
    "KeyProvider",
    "KeyProviderError",
    "LocalKeyProvider",
    "ReencryptReport",
    "RewrapReport",
    "RolloverPolicy",
    "RowKeyRequiredError",
    "UnsupportedQueryError",
    "lookup",
    "normalize_email",
    "normalize_phone",
    "provider_from_spec",
]

__version__ = "0.1.0"
