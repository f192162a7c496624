"""Issue 11: providers trust only their configured wrapping keys; key metadata
is authenticated (namespace included); plaintext keys do not outlive their
cache entry and cannot be pickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, select

from sa_envelope import (
    AwsKmsProvider, BlindIndexType, EncryptedType, KeyManager, KeyProviderError, LocalKeyProvider,
)
from sa_envelope.envelope.ciphers import HmacKey
from sa_envelope.errors import UnauthenticatedKeyError, UntrustedKeyError
from sa_envelope.keys import table as kt
from sa_envelope.providers.base import KeyMeta, key_context

META = KeyMeta("00000000000000aa", "accounts", "table", "AES-256-GCM", 1_700_000_000)
CONTEXT = key_context(META)


def test_version_2_context_binds_every_field() -> None:
    assert CONTEXT == {
        "sa_envelope:table": "accounts", "sa_envelope:key": "00000000000000aa", "sa_envelope:v": "2",
        "sa_envelope:scope": "table", "sa_envelope:alg": "AES-256-GCM", "sa_envelope:created": "1700000000",
    }
    assert key_context(KeyMeta(*list(vars(META).values())[:5], namespace="billing"))["sa_envelope:ns"] == "billing"
    assert key_context(KeyMeta(*list(vars(META).values())[:5], version=1)) == {
        "sa_envelope:table": "accounts", "sa_envelope:key": "00000000000000aa"}


def test_kms_provider_refuses_an_untrusted_cmk_without_calling_kms(
    kms_client: Any, kms_admin: Any, cmk: str, cmk_alias: str
) -> None:
    foreign = kms_admin.create_key()["KeyMetadata"]["Arn"]
    wrapped = kms_admin.generate_data_key(KeyId=foreign, NumberOfBytes=32, EncryptionContext=CONTEXT)["CiphertextBlob"]
    provider = AwsKmsProvider(cmk, client=kms_client)
    with pytest.raises(UntrustedKeyError) as info:
        provider.unwrap(wrapped, CONTEXT, foreign)
    assert isinstance(info.value, KeyProviderError)
    assert "00000000000000aa" in str(info.value) and foreign in str(info.value) and info.value.key_id == META.key_id
    assert sum(kms_client.calls.values()) == 0  # a key ARN needs no DescribeKey either

    # an alias is resolved once (DescribeKey) to its ARN: only that ARN and ``previous`` are trusted
    aliased = AwsKmsProvider(cmk_alias, client=kms_client, previous=[cmk])
    target = kms_admin.describe_key(KeyId=cmk_alias)["KeyMetadata"]["Arn"]
    assert aliased.trusted_wrapping_keys() == {target, cmk}
    assert not aliased.trusts(cmk_alias) and not aliased.trusts(foreign)
    assert kms_client.calls["DescribeKey"] == 1
    aliased.trusted_wrapping_keys()
    assert kms_client.calls["DescribeKey"] == 1


def test_kms_decrypt_names_the_trusted_arn(kms_server: str, kms_admin: Any, cmk: str) -> None:
    from support.attacks import recording_client

    client = recording_client(kms_server)
    old = kms_admin.create_key()["KeyMetadata"]["Arn"]
    wrapped = kms_admin.generate_data_key(KeyId=old, NumberOfBytes=32, EncryptionContext=CONTEXT)["CiphertextBlob"]
    provider = AwsKmsProvider(cmk, client=client, previous=[old])
    assert len(provider.unwrap(wrapped, CONTEXT, old)) == 32
    assert client.seen == [("Decrypt", old)]
    with pytest.raises(UnauthenticatedKeyError):  # a relabelled context
        provider.unwrap(wrapped, {**CONTEXT, "sa_envelope:scope": "blind-index"}, old)


def test_local_provider_trusts_its_key_and_previous_files(tmp_path: Path) -> None:
    old = LocalKeyProvider.from_file(tmp_path / "old.key")
    other = LocalKeyProvider(os.urandom(32))
    new = LocalKeyProvider.from_file(tmp_path / "new.key", previous=[tmp_path / "old.key"])
    assert new.trusted_wrapping_keys() == {new.wrapping_key_id, old.wrapping_key_id}
    data_key = old.generate(CONTEXT)
    assert new.unwrap(data_key.wrapped, CONTEXT, old.wrapping_key_id) == data_key.plaintext
    planted = other.generate(CONTEXT)
    with pytest.raises(UntrustedKeyError) as info:
        new.unwrap(planted.wrapped, CONTEXT, other.wrapping_key_id)
    assert other.wrapping_key_id in str(info.value) and META.key_id in str(info.value)
    with pytest.raises(UnauthenticatedKeyError):
        new.unwrap(data_key.wrapped, {**CONTEXT, "sa_envelope:alg": "HMAC-SHA256"}, old.wrapping_key_id)
    same = LocalKeyProvider(b"\x01" * 32, previous=[b"\x02" * 32])
    assert same.trusts(LocalKeyProvider(b"\x02" * 32).wrapping_key_id)


def test_namespaces_sharing_one_cmk_cannot_use_each_others_keys(engine: Engine) -> None:
    provider = LocalKeyProvider(os.urandom(32))
    billing = KeyManager(engine, provider, namespace="billing")
    billing.create_table()
    t = Table("ns_values", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
              Column("v", EncryptedType(String(20), billing)))
    t.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "v": "billing only"}])
    key_id = billing.encryption_key("ns_values").key_id
    crm = KeyManager(engine, provider, namespace="crm")
    with pytest.raises(UnauthenticatedKeyError):
        crm.decryption_key(key_id, table="ns_values", column="v")
    assert crm.encryption_key("ns_values").key_id != key_id  # never its write key either
    again = KeyManager(engine, provider, namespace="billing")
    t2 = Table("ns_values", MetaData(), Column("id", Integer, primary_key=True), Column("v", EncryptedType(String(20), again)))
    with engine.connect() as conn:
        assert conn.execute(select(t2.c.v)).scalar_one() == "billing only"


def read_memo(column_type: EncryptedType) -> dict[bytes, Any]:
    """A column's read memos, over every engine it is read on."""
    return {h: m for via in column_type._vias.values() for h, m in via.memo.items()}


def test_derived_keys_die_with_the_cache_entry(engine: Engine) -> None:
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    value_type, index_type = EncryptedType(String(20), keys), BlindIndexType("v", keys)
    t = Table("memo_values", MetaData(), Column("id", Integer, primary_key=True, autoincrement=False),
              Column("v", value_type), Column("v_index", index_type))
    t.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "v": "x", "v_index": index_type.digest("x")}])

    def fill() -> None:
        with engine.connect() as conn:
            assert conn.execute(select(t.c.v)).scalar_one() == "x"
        index_type.digest("x")
        assert read_memo(value_type) and index_type._subkey

    fill()
    keys.clear_cache()
    assert read_memo(value_type) == {} and index_type._subkey == {}
    fill()
    table_key = keys.encryption_key("memo_values").key_id
    keys.store.cache.evict(table_key)
    assert read_memo(value_type) == {}
    keys.store.cache.evict(keys.encryption_key("memo_values", kt.SCOPE_BLIND_INDEX).key_id)
    assert index_type._subkey == {}


def test_key_material_refuses_to_be_pickled(local_keys: KeyManager) -> None:
    entry = local_keys.encryption_key("anything")
    data_key = LocalKeyProvider(os.urandom(32)).generate(CONTEXT)
    for secret in (data_key, HmacKey(os.urandom(32)), entry):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(secret)
