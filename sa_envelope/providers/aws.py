"""AWS KMS as a key provider, through an injectable boto3 client.

Data keys come from ``GenerateDataKey``; unwrapping is ``Decrypt``; moving a
key to another CMK is ``ReEncrypt``, so the plaintext never leaves KMS. The
encryption context (table and key id) is bound to every wrapped key and
shows up in CloudTrail. botocore errors become :class:`KeyProviderError`.
boto3 is the optional ``kms`` extra: it is imported on the first KMS call,
so users of the local key file never need it.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, TypeVar

from .. import redact
from ..errors import ConfigurationError, KeyProviderError, UnauthenticatedKeyError
from .base import Context, DataKey, KeyProvider, context_key_id, context_table

__all__ = ["KMS_EXTRA", "AwsKmsProvider"]

KMS_EXTRA = "sa-envelope[kms]"

T = TypeVar("T")


def _default_client(config: Any) -> Any:
    """boto3's default KMS client: credentials and endpoint from the environment.

    The region is ``AWS_REGION`` when set (the name the other AWS SDKs and
    Lambda use; botocore reads only ``AWS_DEFAULT_REGION`` and the profile),
    else botocore's own; with neither, a one-line error says what to set.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigurationError(f"AwsKmsProvider needs boto3: pip install '{KMS_EXTRA}'") from None
    if config is None:
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 4},  # 4 attempts in all
            connect_timeout=5,
            read_timeout=15,
        )
    session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
    if not session.region_name and not getattr(config, "region_name", None):
        raise ConfigurationError(
            "AwsKmsProvider has no AWS region: set AWS_REGION (or AWS_DEFAULT_REGION, or a profile's region)"
        )
    return session.client("kms", config=config)


class AwsKmsProvider(KeyProvider):
    """Wrap data keys with an AWS KMS customer master key.

    ``key_id`` may be a key ARN, a key id, an alias name (``alias/app``) or
    an alias ARN. New keys record the CMK ARN that KMS reports, not the
    alias, so a re-pointed alias is visible to ``rewrap``. ``client`` is any
    boto3 KMS client; by default one is made on first use with botocore's
    ``standard`` retry mode (pass ``config=`` to change the retry policy).

    Only the CMK ``key_id`` resolves to (one ``DescribeKey`` for an alias or
    key id, none for a key ARN) and the ``previous`` CMKs are trusted: a key
    row naming any other wrapping key is refused without calling KMS, and
    ``Decrypt`` always names the trusted ARN as its ``KeyId``.
    """

    def __init__(self, key_id: str, client: Any = None, *, config: Any = None, previous: Iterable[str] = ()) -> None:
        if not key_id:
            raise ConfigurationError("AwsKmsProvider needs a CMK key id, ARN or alias (got an empty one)")
        self._key_id = key_id
        self._client = client
        self._config = config
        self._lock = threading.Lock()
        self._resolved: str | None = key_id if _is_key_arn(key_id) else None
        self._previous = tuple(previous)
        self._trusted: frozenset[str] | None = None
        redact.install()  # botocore's DEBUG logs would show data keys

    @property
    def client(self) -> Any:
        """The boto3 client, made lazily so construction stays offline."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = _default_client(self._config)
        return self._client

    @property
    def wrapping_key_id(self) -> str:
        """The CMK ARN once known (after the first call), else as configured."""
        return self._resolved or self._key_id

    def trusted_wrapping_keys(self) -> frozenset[str]:
        """The CMK's ARN and the previous CMKs' ARNs, resolved once."""
        if self._trusted is None:
            previous = {p if _is_key_arn(p) else self._describe(p) for p in self._previous}
            self._trusted = frozenset({self.resolve(), *previous})
        return self._trusted

    def resolve(self) -> str:
        """The CMK's ARN (one ``DescribeKey`` call the first time)."""
        if self._resolved is None:
            self._resolved = self._describe(self._key_id)
        return self._resolved

    def _describe(self, key_id: str) -> str:
        meta = self._call("DescribeKey", {}, lambda c: c.describe_key(KeyId=key_id))
        arn: str = meta["KeyMetadata"]["Arn"]
        return arn

    def generate(self, context: Context, size: int = 32) -> DataKey:
        response = self._call(
            "GenerateDataKey",
            context,
            lambda c: c.generate_data_key(KeyId=self._key_id, NumberOfBytes=size, EncryptionContext=dict(context)),
        )
        self._resolved = response["KeyId"]
        return DataKey(response["Plaintext"], response["CiphertextBlob"], response["KeyId"])

    def wrap(self, plaintext: bytes, context: Context) -> DataKey:
        response = self._call(
            "Encrypt",
            context,
            lambda c: c.encrypt(KeyId=self._key_id, Plaintext=plaintext, EncryptionContext=dict(context)),
        )
        self._resolved = response["KeyId"]
        return DataKey(plaintext, response["CiphertextBlob"], response["KeyId"])

    def unwrap(self, wrapped: bytes, context: Context, wrapping_key_id: str) -> bytes:
        self.require_trusted(wrapping_key_id, context)  # before any KMS call
        response = self._call(
            "Decrypt",
            context,
            lambda c: c.decrypt(CiphertextBlob=wrapped, KeyId=wrapping_key_id, EncryptionContext=dict(context)),
        )
        plaintext: bytes = response["Plaintext"]
        return plaintext

    def rewrap(
        self, wrapped: bytes, context: Context, wrapping_key_id: str, new_context: Context | None = None
    ) -> tuple[bytes, str] | None:
        if not wrapping_key_id.startswith("arn:aws"):
            return None  # not a KMS key: the caller unwraps and wraps
        response = self._call(
            "ReEncrypt",
            context,
            lambda c: c.re_encrypt(
                CiphertextBlob=wrapped,
                SourceKeyId=wrapping_key_id,
                SourceEncryptionContext=dict(context),
                DestinationKeyId=self._key_id,
                DestinationEncryptionContext=dict(new_context or context),
            ),
        )
        self._resolved = response["KeyId"]
        return response["CiphertextBlob"], response["KeyId"]

    def _call(self, operation: str, context: Context, fn: Callable[[Any], T]) -> T:
        """Run one KMS call, turning every botocore failure into ours."""
        client = self.client  # first: without boto3 it says which extra to install
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(client)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "ClientError")
            reason = f"KMS {operation} refused with {code}"
            error = UnauthenticatedKeyError if code == "InvalidCiphertextException" else KeyProviderError
        except BotoCoreError as exc:
            reason = f"KMS {operation} failed: {type(exc).__name__}"
            error = KeyProviderError
        raise error(
            f"{reason} (CMK {self._key_id}, table {context_table(context) or '-'}, "
            f"key {context_key_id(context) or '-'})",
            table=context_table(context),
            key_id=context_key_id(context),
        )

    def __repr__(self) -> str:
        return f"AwsKmsProvider({self._key_id!r})"


def _is_key_arn(key_id: str) -> bool:
    """A key ARN names one CMK for good; an alias or bare key id needs DescribeKey."""
    return key_id.startswith("arn:aws") and ":key/" in key_id
