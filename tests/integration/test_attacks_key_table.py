"""Issue 11: a database writer cannot choose, revive or relabel the write key.

Each test scripts an attack as someone with read/write access to the
database would run it: raw SQL on ``sa_envelope_keys`` and a boto3 KMS
client of their own (with a CMK of their own in moto, or, for the insider,
the application's CMK). Each ends with: no value written afterwards sealed
under the planted, revived or relabelled key (read from the value headers),
no KMS call naming the attacker's CMK, rewrap leaving a foreign key as it is
and reporting it, verify naming it, and every legitimate value readable.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import boto3
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from support.attacks import (
    TABLE, Attacker, calls_naming, make_model, read_rows, recording_client, row, value_keys, write_rows,
)
from sa_envelope import AwsKmsProvider, EnvelopeError, KeyManager, lookup
from sa_envelope.envelope import format as fmt
from sa_envelope.jobs.verify import verify_database
from sa_envelope.keys import table as kt

SCOPES = (kt.SCOPE_TABLE, kt.SCOPE_DETERMINISTIC, kt.SCOPE_BLIND_INDEX)
SOON = (kt.utcnow() + dt.timedelta(seconds=60)).replace(microsecond=0)  # newest, within the clock skew


@pytest.fixture
def app_client(kms_server: str) -> Any:
    return recording_client(kms_server)


@pytest.fixture
def attacker(engine: Engine, kms_server: str) -> Attacker:
    """Their own client, their own CMK (made with it: not in the app's records)."""
    client = boto3.client("kms", endpoint_url=kms_server, region_name="us-east-1")
    arn = client.create_key(KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"]
    return Attacker(engine, client, arn)


def process(engine: Engine, cmk: str, client: Any, **kw: Any) -> tuple[KeyManager, Any]:
    """A new application process: a manager with a cold cache, and its model."""
    index = kw.pop("index", True)
    keys = KeyManager(engine, AwsKmsProvider(cmk, client=client), **kw)
    keys.create_table()
    Account = make_model(keys, index=index)
    Account.metadata.create_all(engine)
    return keys, Account


def used(engine: Engine, Account: Any, ns: range) -> set[int]:
    """Every key id that values of rows ``ns`` are sealed under (row keys: their parent)."""
    found = value_keys(engine, Account, ns)
    return set().union(*found.values())


def assert_readable(engine: Engine, cmk: str, client: Any, ns: range) -> None:
    """A fresh process reads every legitimate row, and finds them by blind index."""
    keys, Account = process(engine, cmk, client)
    assert read_rows(engine, Account) == {n: row(n) for n in ns}
    with Session(engine) as s:
        assert [a.id for a in lookup(s, Account.email_index, f"user{ns[-1]}@example.com")] == [ns[-1]]


def anomalies(keys: KeyManager) -> dict[str, str]:
    return dict(verify_database(keys.store).anomalies)


# -- 1. planted keys (attacker's CMK, dated in the future) ---------------------------------------


@pytest.mark.parametrize("when", ["before the first write", "after the first write"])
def test_planted_keys_are_never_used_for_new_writes(
    engine: Engine, cmk: str, app_client: Any, attacker: Attacker, when: str
) -> None:
    first = range(0, 5) if when == "after the first write" else range(0)
    if first:
        write_rows(engine, process(engine, cmk, app_client)[1], first)
    else:
        process(engine, cmk, app_client)  # key table and data table exist, no key yet
    # the deterministic and blind-index ids are predictable from the table name
    planted = [attacker.plant(TABLE, scope, key_id=kt.singleton_key_id(TABLE, scope) if not first and scope
                              in kt.SINGLETON_SCOPES else None) for scope in SCOPES]
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(5, 15))

    assert used(engine, Account, range(5, 15)).isdisjoint(planted)
    assert keys.encryption_key(TABLE, kt.SCOPE_BLIND_INDEX).key_id not in planted
    assert calls_naming(app_client, attacker.cmk) == []
    assert_readable(engine, cmk, app_client, range(0, 15) if first else range(5, 15))

    before = {k: attacker.row_of(k) for k in planted}
    report = keys.rewrap()
    assert sorted(report.untrusted) == sorted((fmt.format_key_id(k), attacker.cmk) for k in planted)
    assert not report.complete and report.rewrapped == 0
    assert {k: attacker.row_of(k) for k in planted} == before  # never laundered
    found = anomalies(keys)
    for key_id in planted:
        assert "untrusted" in found[fmt.format_key_id(key_id)]
    assert calls_naming(app_client, attacker.cmk) == []


def test_planted_key_is_refused_on_read_without_calling_kms(
    engine: Engine, cmk: str, app_client: Any, attacker: Attacker
) -> None:
    """A value whose header names a planted key: KeyProviderError naming the
    key id and the untrusted CMK, and no KMS call at all."""
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(0, 3))
    planted = attacker.plant(TABLE, kt.SCOPE_TABLE, ahead=dt.timedelta(0))
    app_client.seen.clear()
    with pytest.raises(EnvelopeError) as info:
        keys.decryption_key(planted, table=TABLE, column="name")
    assert fmt.format_key_id(planted) in str(info.value) and attacker.cmk in str(info.value)
    assert type(info.value).__name__ == "UntrustedKeyError" and app_client.seen == []


def test_cli_rewrap_and_verify_report_a_planted_key(
    engine: Engine, db_url: str, kms_server: str, cmk: str, app_client: Any, attacker: Attacker
) -> None:
    from integration.test_cli import cli

    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(0, 3))
    planted = fmt.format_key_id(attacker.plant(TABLE, kt.SCOPE_TABLE))
    before = attacker.row_of(fmt.parse_key_id(planted))

    rewrap = cli("rewrap", "--database-url", db_url, "--to", cmk, kms_server=kms_server)
    assert rewrap.returncode == 1, rewrap.stderr
    assert "1 untrusted" in rewrap.stdout and f"key {planted}: wrapped by untrusted key {attacker.cmk}" in rewrap.stdout
    assert attacker.row_of(fmt.parse_key_id(planted)) == before

    verify = cli("verify", "--database-url", db_url, "--cmk", cmk, kms_server=kms_server)
    assert verify.returncode == 1, verify.stderr
    assert f"key table anomaly: key {planted}: wrapped by untrusted key {attacker.cmk}" in verify.stdout
    assert "verified 12 values: 12 ok, 0 failed" in verify.stdout


# -- 3. the insider: a key minted under the application's own CMK ---------------------------------


def test_insider_keys_under_the_application_cmk(engine: Engine, cmk: str, app_client: Any) -> None:
    """While they had KMS access they mint keys under our CMK: one dated a
    year ahead (so it would stay newest), one in the context version main
    wrote (which binds no created time), one valid and dated now. After their
    access is revoked the runbook rotates the table keys: no new value goes
    under any of theirs."""
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(0, 5))
    insider = Attacker(engine, boto3.client("kms", endpoint_url=app_client.meta.endpoint_url,
                                            region_name="us-east-1"), cmk)
    future = insider.plant(TABLE, kt.SCOPE_TABLE)
    legacy = insider.plant(TABLE, kt.SCOPE_TABLE, ahead=dt.timedelta(seconds=60), v1=True)
    recent = insider.plant(TABLE, kt.SCOPE_TABLE, ahead=dt.timedelta(0))

    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(5, 8))
    assert used(engine, Account, range(5, 8)).isdisjoint({future, legacy})
    rotated = keys.rotate_table_key(TABLE)  # access revoked: rotate (docs/threat-model.md)
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(8, 12))
    assert value_keys(engine, Account, range(8, 12))["name"] == {rotated}
    assert used(engine, Account, range(8, 12)).isdisjoint({future, legacy, recent})

    found = anomalies(keys)
    assert "in the future" in found[fmt.format_key_id(future)]
    assert "version 1" in found[fmt.format_key_id(legacy)]
    assert_readable(engine, cmk, app_client, range(0, 12))


# -- 4. un-retire -----------------------------------------------------------------------------------


def test_unretired_key_does_not_come_back(engine: Engine, cmk: str, app_client: Any, attacker: Attacker) -> None:
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(0, 5))
    (old,) = value_keys(engine, Account, range(0, 5))["name"]
    new = keys.rotate_table_key(TABLE)  # perhaps because ``old`` leaked

    attacker.sql("UPDATE sa_envelope_keys SET status = 'active' WHERE id = :id", id=old)
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(5, 10))
    assert value_keys(engine, Account, range(5, 10))["name"] == {new}
    assert "current table keys" in anomalies(keys)[fmt.format_key_id(old)]

    # and made to look newest, its successor retired: still not used
    with engine.connect() as conn:
        created = kt.get_record(conn, keys.table, old).created_at  # type: ignore[union-attr]
    attacker.sql("UPDATE sa_envelope_keys SET status = 'retired' WHERE id = :id", id=new)
    attacker.sql("UPDATE sa_envelope_keys SET created_at = :t WHERE id = :id",
                 id=old, t=attacker.stamp(SOON))
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(10, 15))
    assert used(engine, Account, range(10, 15)).isdisjoint({old, new})
    assert "does not authenticate" in anomalies(keys)[fmt.format_key_id(old)]
    # the edited row no longer opens (a database writer can destroy): restored, all reads
    attacker.sql("UPDATE sa_envelope_keys SET created_at = :t WHERE id = :id", id=old, t=created)
    assert_readable(engine, cmk, app_client, range(0, 15))


# -- 5. relabel -------------------------------------------------------------------------------------


def test_relabelled_blind_index_key_is_never_a_table_key(
    engine: Engine, cmk: str, app_client: Any, attacker: Attacker
) -> None:
    keys, Account = process(engine, cmk, app_client)
    write_rows(engine, Account, range(0, 5))
    index_key = kt.singleton_key_id(TABLE, kt.SCOPE_BLIND_INDEX)
    attacker.sql(
        "UPDATE sa_envelope_keys SET scope = 'table', algorithm = 'AES-256-GCM', created_at = :t WHERE id = :id",
        id=index_key, t=attacker.stamp(SOON),
    )
    keys, Account = process(engine, cmk, app_client, index=False)
    write_rows(engine, Account, range(5, 10))
    assert index_key not in used(engine, Account, range(5, 10))
    assert keys.encryption_key(TABLE).key_id != index_key
    assert "does not authenticate" in anomalies(keys)[fmt.format_key_id(index_key)]
    assert read_rows(engine, Account) == {n: row(n) for n in range(10)}
    # the blind index itself fails closed (its key row is gone as such)
    keys, Account = process(engine, cmk, app_client)
    with Session(engine) as s, pytest.raises(EnvelopeError):
        lookup(s, Account.email_index, "user1@example.com")


# -- 6. schemas -------------------------------------------------------------------------------------


@pytest.mark.backends("postgresql")
def test_tables_of_one_name_in_two_schemas_share_no_key(engine: Engine, cmk: str, app_client: Any) -> None:
    from sqlalchemy import LargeBinary, select, text, type_coerce

    from sa_envelope import DecryptionError

    schemas = ("atk_tenant_a", "atk_tenant_b")
    with engine.begin() as conn:
        for name in schemas:
            conn.execute(text(f"CREATE SCHEMA {name}"))
    try:
        keys = KeyManager(engine, AwsKmsProvider(cmk, client=app_client))
        keys.create_table()
        A, B = (make_model(keys, schema=name) for name in schemas)
        for model in (A, B):
            model.metadata.create_all(engine)
            write_rows(engine, model, range(0, 3))
        with engine.connect() as conn:
            owners = set(conn.execute(select(keys.table.c.owner_table)).scalars())
            ssn = [conn.execute(select(type_coerce(m.__table__.c.ssn, LargeBinary)).where(m.__table__.c.id == 1))
                   .scalar_one() for m in (A, B)]
        assert owners == {f"{name}.{TABLE}" for name in schemas}
        assert bytes(ssn[0]) != bytes(ssn[1])  # equal values, unequal bytes across schemas
        with engine.begin() as conn:  # a value copied from tenant_a to tenant_b
            conn.execute(text(f"UPDATE atk_tenant_b.{TABLE} SET name = (SELECT name FROM atk_tenant_a.{TABLE} "
                              f"WHERE id = 1) WHERE id = 1"))
        with Session(engine) as s, pytest.raises(DecryptionError):
            s.scalars(select(B.name).where(B.id == 1)).all()
        with Session(engine) as s:
            assert [a.name for a in s.scalars(select(A).order_by(A.id))] == ["name 0", "name 1", "name 2"]
    finally:
        with engine.begin() as conn:
            for name in schemas:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
