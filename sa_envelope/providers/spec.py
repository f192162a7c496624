"""Providers named by one string, for the CLI and Alembic environments.

``local:PATH`` is a 32-byte key file; anything else is an AWS KMS key (key
ARN, key id, alias name ``alias/...`` or alias ARN), reached with boto3's
standard configuration (``AWS_ENDPOINT_URL_KMS``, region, credentials).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigurationError
from .aws import AwsKmsProvider
from .base import KeyProvider
from .local import LocalKeyProvider

__all__ = ["LOCAL_PREFIX", "provider_from_spec"]

LOCAL_PREFIX = "local:"


def provider_from_spec(spec: str, *, create: bool = False, check: bool = False) -> KeyProvider:
    """The provider ``spec`` names.

    ``create``: make a missing local key file (new keys only; never for a
    key that must unwrap existing data). ``check``: ask KMS now whether the
    CMK exists (one ``DescribeKey``), so a typo fails before any work.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ConfigurationError("no CMK given: pass a KMS key ARN, key id, alias, or local:PATH")
    if spec.startswith(LOCAL_PREFIX):
        path = Path(os.path.expanduser(spec[len(LOCAL_PREFIX) :]))
        if not create and not path.is_file():
            raise ConfigurationError(f"local key file {path} does not exist")
        return LocalKeyProvider.from_file(path)
    provider = AwsKmsProvider(spec)
    if check:
        provider.resolve()
    return provider
