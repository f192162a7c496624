"""sa-envelope: envelope encryption of SQLAlchemy columns.

Declare a column as ``EncryptedType(String(200), keys)`` and its values are
encrypted in the application with a data key (AES-256-GCM, or AES-SIV for
deterministic columns); data keys are wrapped by a master key held by AWS
KMS or, for development, a local key file. See ``docs/`` for the format, the
threat model and the rotation runbook.
"""

from __future__ import annotations

import sys

from .columns.blindindex import BlindIndexType, lookup
from .columns.encrypted import EncryptedType
from .columns.normalizers import normalize_email, normalize_email_folded, normalize_phone, normalize_text_folded
from .errors import (
    ConfigurationError,
    DecryptionError,
    DuplicateValueError,
    UncheckedUpdateError,
    EncryptionError,
    EnvelopeError,
    KeyNotFoundError,
    KeyProviderError,
    MigrationIncompleteError,
    RowKeyRequiredError,
    UnauthenticatedKeyError,
    UnsupportedQueryError,
    UntrustedKeyError,
)
from .jobs.reencrypt import ReencryptReport
from .jobs.rewrap import RewrapReport
from .keys.cache import CacheLimits
from .keys.live import LivePolicy
from .keys.rollover import RolloverPolicy
from .manager import KeyManager
from .providers.aws import AwsKmsProvider
from .providers.base import DataKey, KeyProvider
from .providers.local import LocalKeyProvider
from .providers.spec import provider_from_spec
from .search.indexes import PrefixIndex, SubstringIndex
from .search.ranges import RangeIndex, powers_of
from .search.verify import IndexReport

__all__ = [
    "AwsKmsProvider",
    "BlindIndexType",
    "CacheLimits",
    "ConfigurationError",
    "DataKey",
    "DecryptionError",
    "DuplicateValueError",
    "UncheckedUpdateError",
    "EncryptedType",
    "EncryptionError",
    "EnvelopeError",
    "IndexReport",
    "KeyManager",
    "KeyNotFoundError",
    "KeyProvider",
    "KeyProviderError",
    "LivePolicy",
    "LocalKeyProvider",
    "MigrationIncompleteError",
    "PrefixIndex",
    "RangeIndex",
    "ReencryptReport",
    "RewrapReport",
    "RolloverPolicy",
    "RowKeyRequiredError",
    "SubstringIndex",
    "UnauthenticatedKeyError",
    "UnsupportedQueryError",
    "UntrustedKeyError",
    "lookup",
    "normalize_email",
    "normalize_email_folded",
    "normalize_phone",
    "normalize_text_folded",
    "powers_of",
    "provider_from_spec",
]

__version__ = "0.1.0"

if "alembic" in sys.modules:  # under Alembic: its operations and autogenerate imports (sa_envelope.alembic)
    from . import alembic as _alembic_glue  # noqa: F401
