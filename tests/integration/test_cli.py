"""``sa-envelope keys list``, ``rewrap`` and ``verify`` as a user runs them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import LargeBinary, select, type_coerce
from sqlalchemy.engine import Engine

from sa_envelope import AwsKmsProvider, KeyManager, LocalKeyProvider
from support.rotation import PYTHON, cmk_uuid, expected_row, fill, provider_key_records, read_all, subprocess_env


def cli(*args: str, kms_server: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(kms_server, **env),
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr


def test_keys_list_and_rewrap_between_kms_keys(
    engine: Engine, db_url: str, kms_server: str, kms_client: Any, kms_admin: Any, cmk: str, cmk_alias: str
) -> None:
    fill(engine, KeyManager(engine, AwsKmsProvider(cmk, client=kms_client)), tables=2, rows=20)
    listing = cli("keys", "list", "--database-url", db_url)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count(cmk) == 4 and "deterministic" in listing.stdout and "data_1" in listing.stdout

    # --from: the CMK the keys are wrapped by now (only configured CMKs are trusted)
    result = cli("rewrap", "--database-url", db_url, "--to", cmk_alias, "--from", cmk, kms_server=kms_server)
    assert result.returncode == 0, result.stderr
    assert "4 re-wrapped, 0 already current, 0 failed" in result.stdout
    assert result.stderr == ""  # stderr is not a terminal: no progress bar
    target = kms_admin.describe_key(KeyId=cmk_alias)["KeyMetadata"]["Arn"]
    assert all(r.wrapping_key_id == target and r.wrapped_key.startswith(cmk_uuid(target))
               for r in provider_key_records(engine))
    again = cli("rewrap", "--to", cmk_alias, kms_server=kms_server, SA_ENVELOPE_DATABASE_URL=db_url)
    assert again.returncode == 0 and "0 re-wrapped, 4 already current" in again.stdout

    verify = cli("verify", "--database-url", db_url, kms_server=kms_server)
    assert verify.returncode == 0, verify.stderr
    assert "verified 80 values: 80 ok, 0 failed" in verify.stdout


def test_rewrap_local_key_files_then_verify_reports_failures(engine: Engine, db_url: str, tmp_path: Path) -> None:
    old_file, new_file = tmp_path / "old.key", tmp_path / "new.key"
    old, new = LocalKeyProvider.from_file(old_file), LocalKeyProvider.from_file(new_file)
    (first, second) = fill(engine, KeyManager(engine, old), tables=2, rows=10)

    result = cli("rewrap", "--database-url", db_url, "--to", f"local:{new_file}", "--from", f"local:{old_file}")
    assert result.returncode == 0, result.stderr
    assert {r.wrapping_key_id for r in provider_key_records(engine)} == {new.wrapping_key_id}
    assert read_all(engine, KeyManager(engine, new), 2) == [[expected_row(i) for i in range(10)]] * 2

    with engine.begin() as conn:  # flip one bit of one stored value
        raw = conn.execute(select(type_coerce(first.c.name, LargeBinary)).where(first.c.id == 3)).scalar()
        conn.exec_driver_sql(
            f"UPDATE data_0 SET name = {_hex_literal(engine, raw[:-1] + bytes([raw[-1] ^ 1]))} WHERE id = 3")
    verify = cli("verify", "--database-url", db_url, "--cmk", f"local:{new_file}")
    assert verify.returncode == 1
    failing = [line for line in verify.stdout.splitlines()
               if line.startswith("data_") and " key " in line and "0 failed" not in line]
    assert len(failing) == 1 and failing[0].startswith("data_0.name key ") and "9 ok, 1 failed" in failing[0]
    assert "verified 40 values: 39 ok, 1 failed" in verify.stdout  # went on after the failure
    only = cli("verify", "--database-url", db_url, "--cmk", f"local:{new_file}", "--table", "data_1")
    assert only.returncode == 0 and "verified 20 values: 20 ok" in only.stdout
    assert second.name == "data_1"


def _hex_literal(engine: Engine, value: bytes) -> str:
    if engine.dialect.name == "postgresql":
        return f"'\\x{value.hex()}'::bytea"
    return f"X'{value.hex()}'"


@pytest.mark.backends("sqlite")
def test_errors_are_one_line(db_url: str, kms_server: str, closed_port_url: str, tmp_path: Path) -> None:
    missing = cli("rewrap", "--database-url", db_url, "--to", f"local:{tmp_path}/nope.key")
    assert_one_line_error(missing, "nope.key", "does not exist")
    unknown = cli("rewrap", "--database-url", db_url, "--to", "alias/does-not-exist", kms_server=kms_server)
    assert_one_line_error(unknown, "NotFoundException", "alias/does-not-exist")
    down = cli("keys", "list", "--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert_one_line_error(down, "database error", "OperationalError")
    no_url = cli("keys", "list", SA_ENVELOPE_DATABASE_URL="")
    assert_one_line_error(no_url, "--database-url")
    bad_batch = cli("rewrap", "--database-url", db_url, "--to", f"local:{tmp_path}/k", "--batch-size", "x")
    assert_one_line_error(bad_batch, "--batch-size", "invalid int value")
    assert_one_line_error(cli("keys"), "required")
    unreachable_kms = cli("rewrap", "--database-url", db_url, "--to", "alias/x", kms_server=closed_port_url)
    assert_one_line_error(unreachable_kms, "KMS DescribeKey failed")
