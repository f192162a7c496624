"""Key providers without a database: offline construction, the local key file."""

from __future__ import annotations

import os
import stat
from typing import Any

import boto3
import pytest

from sa_envelope import AwsKmsProvider, ConfigurationError, KeyManager, KeyProviderError, LocalKeyProvider


def test_construction_is_offline(closed_port_url: str) -> None:
    from sqlalchemy import create_engine

    client = boto3.client("kms", endpoint_url=closed_port_url, region_name="us-east-1")
    provider = AwsKmsProvider("alias/does-not-matter", client=client)
    KeyManager(create_engine("sqlite://"), provider)
    lazy = AwsKmsProvider("alias/app")
    assert lazy._client is None  # no boto3 client (and so no call) until first use


def test_local_key_file_is_created_private_and_reused(tmp_path: Any) -> None:
    path = tmp_path / "keys" / "master.key"
    first = LocalKeyProvider.from_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.stat().st_size == 32
    again = LocalKeyProvider.from_file(path)
    context = {"sa_envelope:table": "t", "sa_envelope:key": "0000000000000001"}
    data_key = first.generate(context)
    assert again.unwrap(data_key.wrapped, context, data_key.wrapping_key_id) == data_key.plaintext
    assert "plaintext=<hidden>" in repr(data_key) and data_key.plaintext.hex() not in repr(data_key)
    with pytest.raises(KeyProviderError):
        again.unwrap(data_key.wrapped, {**context, "sa_envelope:table": "u"}, data_key.wrapping_key_id)
    path.write_bytes(b"short")
    with pytest.raises(ConfigurationError):
        LocalKeyProvider.from_file(path)
