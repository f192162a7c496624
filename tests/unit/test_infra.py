"""Proves the shared fixtures that need no database (backends marker, moto KMS, closed port)."""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import pytest


def test_kms_server_answers(kms_client: Any) -> None:
    assert "Keys" in kms_client.list_keys()


def test_call_counter_counts(kms_client: Any, cmk: str) -> None:
    assert sum(kms_client.calls.values()) == 0  # the cmk fixture uses kms_admin
    kms_client.list_keys()
    kms_client.encrypt(KeyId=cmk, Plaintext=b"x")
    kms_client.encrypt(KeyId=cmk, Plaintext=b"y")
    assert kms_client.calls == {"ListKeys": 1, "Encrypt": 2}


def test_cmk_alias_resolves(kms_client: Any, cmk_alias: str) -> None:
    assert cmk_alias.startswith("alias/test-")
    blob = kms_client.encrypt(KeyId=cmk_alias, Plaintext=b"secret")["CiphertextBlob"]
    assert kms_client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"secret"


def test_closed_port_refuses(closed_port_url: str) -> None:
    parts = urlsplit(closed_port_url)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((parts.hostname, parts.port), timeout=5)
