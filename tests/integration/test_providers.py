"""Key providers: AWS KMS over real HTTP to moto, and the local key file."""

from __future__ import annotations

import os
from typing import Any

import boto3
import pytest
from botocore.config import Config
from sqlalchemy import String, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import (
    AwsKmsProvider,
    EncryptedType,
    KeyManager,
    KeyProvider,
    KeyProviderError,
    LocalKeyProvider,
)
from support.models import new_base


def build(engine: Engine, provider: KeyProvider) -> tuple[KeyManager, type]:
    keys = KeyManager(engine, provider)

    Base = new_base()

    class Account(Base):
        __tablename__ = "pv_accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(EncryptedType(String(120), keys))
        ssn: Mapped[str | None] = mapped_column(EncryptedType(String(11), keys, deterministic=True))

    keys.create_table()
    Base.metadata.create_all(engine)
    return keys, Account


def cmk_forms(kms_admin: Any, arn: str) -> dict[str, str]:
    key_id = arn.rsplit("/", 1)[1]
    alias = f"alias/pv-{key_id[:8]}"
    kms_admin.create_alias(AliasName=alias, TargetKeyId=key_id)
    region_account = arn.split(":key/")[0]
    return {"arn": arn, "key_id": key_id, "alias": alias, "alias_arn": f"{region_account}:{alias}"}


@pytest.mark.parametrize("form", ["arn", "key_id", "alias", "alias_arn"])
def test_every_form_of_cmk_id_works_and_the_arn_is_recorded(
    engine: Engine, kms_admin: Any, kms_client: Any, cmk: str, form: str
) -> None:
    key_ref = cmk_forms(kms_admin, cmk)[form]
    keys, Account = build(engine, AwsKmsProvider(key_ref, client=kms_client))
    with Session(engine) as s:
        s.add(Account(email="a@example.com", ssn="123-45-6789"))
        s.commit()
    with engine.connect() as conn:
        recorded = set(conn.execute(select(keys.table.c.wrapping_key_id)).scalars())
    assert recorded == {cmk}
    reader, Account2 = build(engine, AwsKmsProvider(key_ref, client=kms_client))
    with Session(engine) as s:
        assert s.scalars(select(Account2.email)).one() == "a@example.com"


def test_default_client_follows_boto3_environment(
    engine: Engine, kms_server: str, cmk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_server)
    keys, Account = build(engine, AwsKmsProvider(cmk))
    with Session(engine) as s:
        s.add(Account(email="env@example.com"))
        s.commit()
    assert keys.stats()["provider_calls"] == 1


def test_unreachable_kms_on_first_write(engine: Engine, closed_port_url: str) -> None:
    client = boto3.client(
        "kms", endpoint_url=closed_port_url, region_name="us-east-1",
        config=Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=1),
    )
    keys, Account = build(engine, AwsKmsProvider("alias/app", client=client))
    with Session(engine) as s:
        s.add(Account(email="never@example.com"))
        with pytest.raises(KeyProviderError) as info:
            s.commit()
        s.rollback()
    assert info.value.table == "pv_accounts"
    assert "pv_accounts" in str(info.value) and "never@example.com" not in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Account.__table__)).scalar() == 0
        assert conn.execute(select(func.count()).select_from(keys.table)).scalar() == 0


def test_provider_call_budget_for_20000_rows(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys, Account = build(engine, AwsKmsProvider(cmk, client=kms_client))
    with Session(engine) as s:
        s.execute(insert(Account), [{"email": f"user{i}@example.com", "ssn": f"{i:09d}"} for i in range(20_000)])
        s.commit()
    writes = sum(kms_client.calls.values())
    assert writes <= 2 and kms_client.calls["GenerateDataKey"] == 2
    assert keys.stats()["provider_calls"] == writes
    kms_client.calls.clear()
    reader, Account2 = build(engine, AwsKmsProvider(cmk, client=kms_client))
    with Session(engine) as s:
        rows = s.scalars(select(Account2)).all()
        assert len(rows) == 20_000 and rows[-1].email == "user19999@example.com"
        assert rows[-1].ssn == "000019999"
    assert sum(kms_client.calls.values()) <= 2 and kms_client.calls["Decrypt"] == 2


def test_encryption_context_binds_the_table(engine: Engine, kms_client: Any, cmk: str) -> None:
    keys, Account = build(engine, AwsKmsProvider(cmk, client=kms_client))
    with Session(engine) as s:
        s.add(Account(email="ctx@example.com"))
        s.commit()
    with engine.begin() as conn:  # claim the key belongs to another table
        conn.execute(update(keys.table).values(owner_table="elsewhere"))
    reader, Account2 = build(engine, AwsKmsProvider(cmk, client=kms_client))
    with Session(engine) as s, pytest.raises(KeyProviderError) as info:
        s.scalars(select(Account2.email)).all()
    assert "InvalidCiphertextException" in str(info.value)


def test_wrong_local_key_is_a_provider_error(engine: Engine) -> None:
    keys, Account = build(engine, LocalKeyProvider(os.urandom(32), key_id="dev"))
    with Session(engine) as s:
        s.add(Account(email="x@example.com"))
        s.commit()
    other, Account2 = build(engine, LocalKeyProvider(os.urandom(32), key_id="dev"))
    with Session(engine) as s, pytest.raises(KeyProviderError) as info:
        s.scalars(select(Account2.email)).all()
    assert info.value.table == "pv_accounts" and info.value.key_id
