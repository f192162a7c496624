"""CMK rotation by re-wrap: every table key moves to the new CMK, no row changes."""

from __future__ import annotations

import os
import subprocess
import threading
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine

from sa_envelope import AwsKmsProvider, KeyManager, LocalKeyProvider, RewrapReport
from sa_envelope import faults
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from sa_envelope.providers.base import key_context
from support.keyrows import context_of
from support.models import data_tables
from support.rotation import (
    PYTHON, cmk_uuid, expected_row, fill, provider_key_records, read_all, stored_hash,
    subprocess_env,
)


@pytest.fixture
def cmk_b(kms_admin: Any) -> str:
    return str(kms_admin.create_key(KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"])


def assert_all_wrapped_by(engine: Engine, arn: str) -> None:
    records = provider_key_records(engine)
    assert records
    for record in records:
        assert record.wrapping_key_id == arn
        assert record.wrapped_key is not None and record.wrapped_key.startswith(cmk_uuid(arn))


def test_rewrap_a_to_b_moves_keys_not_rows(engine: Engine, kms_client: Any, cmk: str, cmk_b: str) -> None:
    keys = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client))
    fill(engine, keys, tables=3, rows=200)
    before = stored_hash(engine)
    key_count = len(provider_key_records(engine))
    assert key_count == 6  # a table key and a deterministic key per table
    kms_client.calls.clear()

    report = keys.rewrap(to=AwsKmsProvider(cmk_b, client=kms_client), batch_size=4)

    assert (report.rewrapped, report.current, report.failed, report.locked) == (key_count, 0, 0, 0)
    assert_all_wrapped_by(engine, cmk_b)
    assert stored_hash(engine) == before
    # One ReEncrypt per key whatever the row count; the plaintext never left KMS.
    assert kms_client.calls["ReEncrypt"] == key_count
    assert kms_client.calls["Decrypt"] == kms_client.calls["Encrypt"] == 0
    fresh = KeyManager(engine, AwsKmsProvider(cmk_b, client=kms_client))
    assert read_all(engine, fresh, 3) == [[expected_row(i) for i in range(200)]] * 3
    # The process that did the rewrap keeps reading with its cached keys...
    assert read_all(engine, keys, 3)[0][0] == expected_row(0)
    # ...and now wraps new keys with the target.
    assert keys.provider.wrapping_key_id == cmk_b

    kms_client.calls.clear()
    again = keys.rewrap(batch_size=4)
    assert (again.rewrapped, again.current, again.failed) == (0, key_count, 0)
    assert not {"ReEncrypt", "Encrypt", "GenerateDataKey", "Decrypt"} & set(kms_client.calls)


def test_rewrap_local_key_to_kms(engine: Engine, kms_client: Any, cmk: str) -> None:
    local = LocalKeyProvider(os.urandom(32))
    keys = KeyManager(engine, local)
    fill(engine, keys, tables=2, rows=50)
    before = stored_hash(engine)
    kms_client.calls.clear()

    report = keys.rewrap(to=AwsKmsProvider(cmk, client=kms_client), source=local)

    assert report.complete and report.rewrapped == 4
    assert kms_client.calls["Encrypt"] == 4  # across providers: unwrap locally, wrap in KMS
    assert_all_wrapped_by(engine, cmk)
    assert stored_hash(engine) == before
    fresh = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client))
    assert read_all(engine, fresh, 2) == [[expected_row(i) for i in range(50)]] * 2


def test_rewrap_reports_refused_keys_and_goes_on(engine: Engine, kms_client: Any, cmk: str) -> None:
    old, new = LocalKeyProvider(os.urandom(32)), LocalKeyProvider(os.urandom(32))
    keys = KeyManager(engine, old)
    fill(engine, keys, tables=2, rows=5)
    with engine.begin() as conn:  # one key whose wrapped bytes no longer authenticate
        record = provider_key_records(engine)[0]
        conn.execute(keys.table.update().where(keys.table.c.id == record.id).values(wrapped_key=b"\0" * 60))

    report = keys.rewrap(to=new, source=old, batch_size=1)

    assert (report.rewrapped, report.failed) == (3, 1)
    assert report.failures[0][0] == f"{record.id:016x}"
    assert not report.complete and keys.provider is old  # not switched: a key is left behind


def _bulk_keys(engine: Engine, keys: KeyManager, count: int) -> None:
    """``count`` real KMS-wrapped keys, inserted directly (fast set-up)."""
    records = []
    for i in range(count):
        key_id = fmt.new_key_id()
        owner = f"bulk_{i}"
        data_key = keys.provider.generate(key_context(owner, fmt.format_key_id(key_id)), 32)
        records.append(kt.KeyRecord(key_id, kt.SCOPE_TABLE, owner, None, data_key.wrapping_key_id,
                                    data_key.wrapped, "AES-256-GCM", kt.ACTIVE))
    with engine.begin() as conn:
        for record in records:
            kt.insert_record(conn, keys.table, record)


REWRAP_SCRIPT = """
import os, signal, sys
from sqlalchemy import create_engine
from sa_envelope import KeyManager, faults, provider_from_spec

url, source, target, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = []
def hook(name):
    if name == "rewrap.key.after_update":
        seen.append(name)
        if len(seen) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
keys = KeyManager(create_engine(url), provider_from_spec(source))
with faults.inject(hook):
    report = keys.rewrap(to=provider_from_spec(target), batch_size=50)
print(report)
sys.exit(0 if report.complete else 3)
"""


def test_rewrap_killed_mid_run_then_resumed(engine: Engine, db_url: str, tmp_path: Any) -> None:
    """Local key files keep 2,000 keys fast; the job's path is the same as with KMS."""
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    old, new = LocalKeyProvider.from_file(old_file), LocalKeyProvider.from_file(new_file)
    keys = KeyManager(engine, old)
    fill(engine, keys, tables=1, rows=50)
    _bulk_keys(engine, keys, 2000)
    before = stored_hash(engine)
    args = [PYTHON, "-c", REWRAP_SCRIPT, db_url, f"local:{old_file}", f"local:{new_file}"]

    # SIGKILL in the middle of the tenth batch, after 25 of its 50 updates.
    killed = subprocess.run([*args, str(9 * 50 + 25)], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    moved = [r for r in provider_key_records(engine) if r.wrapping_key_id == new.wrapping_key_id]
    assert len(moved) == 9 * 50  # committed batches only; the tenth rolled back

    resumed = subprocess.run([*args, "0"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "1552 re-wrapped, 450 already current, 0 failed" in resumed.stdout
    records = provider_key_records(engine)
    assert {r.wrapping_key_id for r in records} == {new.wrapping_key_id}
    assert stored_hash(engine) == before
    fresh = KeyManager(engine, new)
    assert read_all(engine, fresh, 1) == [[expected_row(i) for i in range(50)]]
    for record in records:  # every wrapped key opens under the new key file
        new.unwrap(record.wrapped_key, context_of(record), new.wrapping_key_id)  # upgraded to context version 2


@pytest.mark.backends("postgresql", "mysql")
def test_two_workers_share_the_work(db_url: str, engine: Engine, kms_client: Any, cmk: str, cmk_b: str) -> None:
    keys = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client))
    keys.create_table()
    _bulk_keys(engine, keys, 120)
    kms_client.calls.clear()
    second_committed = threading.Event()
    reports: dict[str, RewrapReport] = {}
    errors: list[BaseException] = []

    def hook(name: str) -> None:
        # Worker one holds its first batch open until worker two has committed
        # one of its own: without SKIP LOCKED, worker two would block on it.
        me = threading.current_thread().name
        if me == "one" and name == "rewrap.batch.before_commit" and not second_committed.is_set():
            assert second_committed.wait(60), "worker two never committed while one held its locks"
        if me == "two" and name == "rewrap.batch.after_commit":
            second_committed.set()

    def work(name: str) -> None:
        own = create_engine(db_url)
        try:
            worker = KeyManager(own, AwsKmsProvider(cmk, client=kms_client))
            reports[name] = worker.rewrap(to=AwsKmsProvider(cmk_b, client=kms_client), batch_size=10)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    one = threading.Thread(target=work, args=("one",), name="one")
    two = threading.Thread(target=work, args=("two",), name="two")
    with faults.inject(hook):
        one.start()
        second_committed.wait(0)  # let one claim first
        two.start()
        one.join(120)
        two.join(120)
    assert not errors, errors
    assert reports["one"].rewrapped > 0 and reports["two"].rewrapped > 0
    assert reports["one"].rewrapped + reports["two"].rewrapped == 120
    assert kms_client.calls["ReEncrypt"] == 120  # every key re-wrapped exactly once
    assert_all_wrapped_by(engine, cmk_b)


def test_application_writes_during_rewrap(engine: Engine, kms_client: Any, cmk: str, cmk_b: str) -> None:
    keys = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client))
    tables = fill(engine, keys, tables=2, rows=20)
    app_engine = create_engine(engine.url)
    app = KeyManager(app_engine, AwsKmsProvider(cmk, client=kms_client))
    app_tables = data_tables(app, 3)  # data_2 is new: its first write creates keys mid-rewrap
    app_tables[2].create(app_engine)
    # SQLite has one writer: the application writes between batches there.
    point = "rewrap.batch.after_commit" if engine.dialect.name == "sqlite" else "rewrap.batch.before_commit"
    written: list[int] = []

    def hook(name: str) -> None:
        if name == point and not written:
            with app_engine.begin() as conn:
                for table in app_tables:
                    conn.execute(table.insert(), [expected_row(i) for i in range(100, 110)])
            written.append(1)

    try:
        with faults.inject(hook):
            # One batch claims every key: under gap locks, any key insert would wait.
            report = keys.rewrap(to=AwsKmsProvider(cmk_b, client=kms_client), batch_size=100)
        assert written and report.complete
        assert_all_wrapped_by(engine, cmk_b)
        fresh = KeyManager(engine, AwsKmsProvider(cmk_b, client=kms_client))
        rows = read_all(engine, fresh, 3)
        assert rows[0] == rows[1] == [expected_row(i) for i in [*range(20), *range(100, 110)]]
        assert rows[2] == [expected_row(i) for i in range(100, 110)]
        assert len(tables) == 2
    finally:
        app_engine.dispose()


def test_rewrap_leaves_row_keys_and_rows_alone(engine: Engine, kms_client: Any, cmk: str, cmk_b: str) -> None:
    from sqlalchemy import JSON, String
    from sqlalchemy.orm import Session

    from support.models import patients_model
    from sa_envelope import EncryptedType
    from sa_envelope.jobs.verify import verify_database

    keys = KeyManager(engine, AwsKmsProvider(cmk, client=kms_client))
    keys.create_table()
    Patient = patients_model(name=EncryptedType(String(50), keys), notes=EncryptedType(JSON, keys, scope="row"))
    Patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Patient(id=i, name=f"p{i}", notes={"n": i}) for i in range(1, 301)])
        session.commit()
    with engine.connect() as conn:
        row_keys = conn.execute(select(keys.table).where(keys.table.c.parent_id.is_not(None))
                                .order_by(keys.table.c.id)).all()
    assert len([k for k in row_keys if k.scope == "row"]) == 300
    assert len(row_keys) == 301 and {k.scope for k in row_keys} == {"row", "row-digest"}  # + the row-digest key (issue 12)
    before = stored_hash(engine)
    kms_client.calls.clear()

    report = keys.rewrap(to=AwsKmsProvider(cmk_b, client=kms_client))

    assert report.rewrapped == 1 and kms_client.calls["ReEncrypt"] == 1  # the table key only
    assert_all_wrapped_by(engine, cmk_b)
    with engine.connect() as conn:
        assert conn.execute(select(keys.table).where(keys.table.c.parent_id.is_not(None))
                            .order_by(keys.table.c.id)).all() == row_keys
    assert stored_hash(engine) == before
    fresh = KeyManager(engine, AwsKmsProvider(cmk_b, client=kms_client))
    FreshPatient = patients_model(name=EncryptedType(String(50), fresh), notes=EncryptedType(JSON, fresh, scope="row"))
    with Session(engine) as session:
        rows = session.scalars(select(FreshPatient).order_by(FreshPatient.id)).all()
        assert [(p.name, p.notes) for p in rows] == [(f"p{i}", {"n": i}) for i in range(1, 301)]
    verified = verify_database(fresh.store)  # no models: finds both columns by their headers
    assert (verified.ok, verified.failed) == (600, 0)
