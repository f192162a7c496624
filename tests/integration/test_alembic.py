"""Alembic: the example environment end to end, column encryption, autogenerate."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import AwsKmsProvider, EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope import faults
from sa_envelope.alembic import render_item
from sa_envelope.columns.guardrows import GUARD_TABLE
from sa_envelope.keys import table as kt
from support.models import patients_model
from support.rotation import PYTHON, ROOT, cmk_uuid, provider_key_records, stored_hash, subprocess_env

INI = str(ROOT / "migrations_example" / "alembic.ini")
ROWS = 300


def patient_model(keys: KeyManager) -> Any:
    """The ORM view of migrations_example's ``patients`` at head."""
    return patients_model(
        name=EncryptedType(String(200), keys),
        ssn=EncryptedType(String(11), keys, deterministic=True),
        email=EncryptedType(String(200), keys),
    )


def seed(engine: Engine, keys: KeyManager, rows: int = ROWS) -> None:
    """Rows as the application wrote them at revision 0001 (email still plaintext)."""
    table = Table(
        "patients",
        MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", EncryptedType(String(200), keys)),
        Column("ssn", EncryptedType(String(11), keys, deterministic=True)),
        Column("email", String(200)),
    )
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {
                    "id": i,
                    "name": f"patient {i}",
                    "ssn": f"{i:03d}-00-0000",
                    "email": f"p{i}@example.org" if i % 7 else None,
                }
                for i in range(1, rows + 1)
            ],
        )


def check_orm(engine: Engine, keys: KeyManager, rows: int = ROWS) -> None:
    Patient = patient_model(keys)
    with Session(engine) as session:
        patients = session.scalars(select(Patient).order_by(Patient.id)).all()
        assert [(p.id, p.name, p.ssn, p.email) for p in patients] == [
            (i, f"patient {i}", f"{i:03d}-00-0000", f"p{i}@example.org" if i % 7 else None) for i in range(1, rows + 1)
        ]
        assert session.scalars(select(Patient.id).where(Patient.ssn == "042-00-0000")).all() == [42]


def alembic(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "alembic", "-c", INI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_migrations_example_upgrade_then_rotate(
    engine: Engine, db_url: str, kms_server: str, kms_client: Any, kms_admin: Any, cmk: str
) -> None:
    cmk_b = kms_admin.create_key(KeySpec="SYMMETRIC_DEFAULT")["KeyMetadata"]["Arn"]
    env = subprocess_env(kms_server, SA_ENVELOPE_DATABASE_URL=db_url, SA_ENVELOPE_CMK=cmk)
    alembic(env, "upgrade", "0001")
    seed(engine, KeyManager(engine, AwsKmsProvider(cmk, client=kms_client)))

    alembic(env, "upgrade", "head")
    assert {c["name"]: c["nullable"] for c in inspect(engine).get_columns("patients")}["email"] is True
    check_orm(engine, KeyManager(engine, AwsKmsProvider(cmk, client=kms_client)))
    before = stored_hash(engine)

    # The next CMK rotation: the last revision, applied again with the new CMK.
    rotated = dict(env, SA_ENVELOPE_CMK=cmk_b, SA_ENVELOPE_SOURCE_CMK=cmk)  # the old CMK, trusted
    alembic(rotated, "downgrade", "-1")
    alembic(rotated, "upgrade", "head")
    records = provider_key_records(engine)
    assert len(records) == 2  # the patients table key and its deterministic key
    assert all(r.wrapping_key_id == cmk_b and r.wrapped_key.startswith(cmk_uuid(cmk_b)) for r in records)
    assert stored_hash(engine) == before
    check_orm(engine, KeyManager(engine, AwsKmsProvider(cmk_b, client=kms_client)))

    alembic(rotated, "downgrade", "0001")  # decrypts email back to plaintext
    with engine.connect() as conn:
        emails = conn.execute(select(Table("patients", MetaData(), autoload_with=conn).c.email)).scalars().all()
    assert sorted(e for e in emails if e) == sorted(f"p{i}@example.org" for i in range(1, ROWS + 1) if i % 7)


def _config(db_url: str, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("SA_ENVELOPE_DATABASE_URL", db_url)
    monkeypatch.setenv("SA_ENVELOPE_CMK", f"local:{key_file}")
    return Config(INI)


@pytest.mark.parametrize(
    ("crash_at", "then_drop"),
    [
        ("encrypt_column.batch.after_commit", False),
        ("encrypt_column.before_swap", False),
        ("encrypt_column.before_swap", True),  # as MariaDB dying between DROP and RENAME leaves it
    ],
    ids=["mid-copy", "before-swap", "mid-swap"],
)
def test_encrypt_column_resumes_after_a_crash(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str, then_drop: bool
) -> None:
    key_file = tmp_path / "master.key"
    config = _config(db_url, key_file, monkeypatch)
    command.upgrade(config, "0001")
    keys = KeyManager(engine, LocalKeyProvider.from_file(key_file))
    seed(engine, keys, rows=1200)  # three batches of 500
    hits: list[str] = []

    def crash(name: str) -> None:
        if name == crash_at:
            hits.append(name)
            if len(hits) == 1:
                raise ConnectionError("simulated crash")

    with faults.inject(crash), pytest.raises(ConnectionError):
        command.upgrade(config, "0002")
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
        temp = Table("patients", MetaData(), autoload_with=conn).c.email__sa_envelope_new
        done = conn.execute(select(temp).where(temp.is_not(None))).all()
    assert len(done) == (500 if crash_at.endswith("after_commit") else sum(1 for i in range(1, 1201) if i % 7))
    if then_drop:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE patients DROP COLUMN email")
    command.upgrade(config, "0002")
    assert "email__sa_envelope_new" not in {c["name"] for c in inspect(engine).get_columns("patients")}
    check_orm(engine, KeyManager(engine, LocalKeyProvider.from_file(key_file)), rows=1200)


@pytest.mark.backends("sqlite")
def test_autogenerate_renders_encrypted_type_and_sees_the_key_table(engine: Engine) -> None:
    metadata = MetaData()
    keys = KeyManager(engine, LocalKeyProvider(b"k" * 32), metadata=metadata)
    Table(
        "notes",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("body", EncryptedType(String(200), keys, deterministic=True)),
    )
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"target_metadata": metadata})
        migration = produce_migrations(context, metadata)
    code = render_python_code(migration.upgrade_ops, render_item=render_item)
    assert "sa.Column('body', sa_envelope.EncryptedType(sa.String(length=200), deterministic=True)" in code
    assert f"op.create_table('{kt.KEY_TABLE_NAME}'" in code
    autogen = AutogenContext(
        MigrationContext.configure(
            dialect_name="sqlite",
            opts={"sqlalchemy_module_prefix": "sa.", "alembic_module_prefix": "op.", "user_module_prefix": None},
        )
    )
    assert render_item("type", EncryptedType(String(5), scope="row"), autogen) == (
        "sa_envelope.EncryptedType(sa.String(length=5), scope='row')"
    )
    assert "import sa_envelope" in autogen.imports
    assert render_item("type", String(5), autogen) is False
    # The rendered DDL needs no KeyManager: run it.
    namespace: dict[str, Any] = {}
    exec(
        "import sqlalchemy as sa\nimport sa_envelope\n"
        "t = sa_envelope.EncryptedType(sa.String(length=200), deterministic=True)",
        namespace,
    )
    Table("notes2", MetaData(), Column("id", Integer, primary_key=True), Column("body", namespace["t"])).create(engine)
    assert "notes2" in inspect(engine).get_table_names()


@pytest.mark.backends("sqlite")
def test_key_table_operation_offline_sql(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    config = _config(db_url, tmp_path / "k.key", monkeypatch)
    command.upgrade(config, "0001", sql=True)
    out = capsys.readouterr().out
    assert f"CREATE TABLE {kt.KEY_TABLE_NAME}" in out and f"CREATE INDEX ix_{kt.KEY_TABLE_NAME}_owner" in out
    assert f"CREATE TABLE {GUARD_TABLE}" in out and f"CREATE INDEX ix_{GUARD_TABLE}_owner_table" in out
    engine = create_engine(db_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.backends("sqlite")
def test_rewrap_operation_takes_cmk_strings(engine: Engine, tmp_path: Path) -> None:
    from alembic.operations import Operations

    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    keys = KeyManager(engine, LocalKeyProvider.from_file(old_file))
    keys.create_table()
    table = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("v", EncryptedType(String(9), keys)))
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": 1, "v": "secret"}])
    new = LocalKeyProvider.from_file(new_file)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"transaction_per_migration": True})
        with context.begin_transaction(_per_migration=True):  # as Alembic runs one revision
            Operations(context).rewrap_keys(to=f"local:{new_file}", source=f"local:{old_file}", keys=keys)
    assert {r.wrapping_key_id for r in provider_key_records(engine)} == {new.wrapping_key_id}
    with engine.connect() as conn:
        fresh = Table(
            "t",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("v", EncryptedType(String(9), KeyManager(engine, new))),
        )
        assert conn.execute(select(fresh.c.v)).scalar_one() == "secret"
