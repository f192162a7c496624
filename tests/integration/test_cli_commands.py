"""Every ``sa-envelope`` command as a user runs it: real subprocesses, every backend.

verify after a key row was deleted and with the wrong provider, export
round-trips (CSV and JSON lines, one row by primary key), rotate then
reencrypt, shred by key and by row, ``--json``, ``--version``, one-line
errors for a missing driver, and Ctrl-C in the middle of a rewrap, a
re-encryption and an export (paused at a fault point, or blocked on a
full pipe), each followed by a rerun that finishes the work.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import fcntl
import datetime as dt
import io
import json
import os
import pty
import signal
import struct
import subprocess
import termios
import time
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import JSON, Boolean, Column, Date, Integer, LargeBinary, MetaData, Numeric, String, Table, delete, insert, select, type_coerce
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_envelope import LivePolicy, EncryptedType, KeyManager, LocalKeyProvider
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support import ROOT
from support.models import data_tables, new_base, row_scope_model
from support.rotation import (
    PYTHON, expected_row, fill, key_statuses, provider_key_records, read_all, subprocess_env,
)

INTERRUPT = ROOT / "tests" / "support" / "cli_interrupt.py"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(None, **env),
                          capture_output=True, text=True, timeout=180)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stdout.strip().splitlines()  # one JSON object, nothing else
    return json.loads(line)


def local(tmp_path: Path, name: str = "master.key") -> tuple[LocalKeyProvider, str]:
    return LocalKeyProvider.from_file(tmp_path / name), f"local:{tmp_path / name}"


# -- verify -----------------------------------------------------------------------------------


def test_verify_after_a_key_row_was_deleted(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=2, rows=10)
    (lost,) = key_statuses(engine, "data_0")
    key_table = kt.key_table(MetaData())
    with engine.begin() as conn:
        conn.execute(delete(key_table).where(key_table.c.id == lost))
    shown = fmt.format_key_id(lost)

    result = cli("verify", "--database-url", db_url, "--cmk", cmk)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"key {shown} named by 10 values of data_0.name is missing from the key table" in result.stdout
    assert "data_0.name: 0 ok, 0 erased, 10 failed (10 missing key)" in result.stdout
    assert "data_0.ssn: 10 ok, 0 erased, 0 failed" in result.stdout
    assert "verified 40 values: 30 ok, 10 failed" in result.stdout
    assert "does not authenticate" not in result.stdout and "cannot unwrap" not in result.stdout

    report = as_json(cli("verify", "--database-url", db_url, "--cmk", cmk, "--json"))
    assert report["command"] == "verify" and report["complete"] is False
    columns = {(c["table"], c["column"]): c for c in report["columns"]}
    assert columns[("data_0", "name")] == {"table": "data_0", "column": "name", "ok": 0, "erased": 0, "failed": 10,
                                           "missing_key": 10}
    assert (report["ok"], report["failed"]) == (30, 10)


def test_verify_with_the_wrong_provider_says_cannot_unwrap(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, _ = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=1, rows=5)
    _, wrong = local(tmp_path, "other.key")
    result = cli("verify", "--database-url", db_url, "--cmk", wrong)
    assert result.returncode == 1
    for key_id in key_statuses(engine, "data_0"):
        assert (f"this provider cannot unwrap key {fmt.format_key_id(key_id)} (configure the provider that "
                "wrapped it): 5 values of data_0.name") in result.stdout
    assert "data_0.name: 0 ok, 0 erased, 5 failed (5 cannot unwrap)" in result.stdout
    assert "does not authenticate" not in result.stdout and "missing" not in result.stdout


def test_verify_names_the_row_of_a_tampered_value(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=1, rows=10)
    table = Table("data_0", MetaData(), autoload_with=engine)  # the stored bytes, as a database writer sees them
    with engine.begin() as conn:
        stored = bytes(conn.execute(select(table.c.name).where(table.c.id == 3)).scalar_one())
        conn.execute(table.update().where(table.c.id == 3).values(name=stored[:-1] + bytes([stored[-1] ^ 1])))
    result = cli("verify", "--database-url", db_url, "--cmk", cmk)
    assert result.returncode == 1
    (key_id,) = [k for k, s in key_statuses(engine, "data_0").items()]
    assert f"value id=3 of data_0.name does not authenticate (key {fmt.format_key_id(key_id)})" in result.stdout
    assert "data_0.name: 9 ok, 0 erased, 1 failed (1 value does not authenticate)" in result.stdout


def on_terminal(*args: str, stream: str) -> tuple[subprocess.CompletedProcess[str], bytes]:
    """Run the CLI with ``stream`` (stdout or stderr) on a pseudo-terminal; the other is a pipe."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm sizes the bar to it
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: terminal}
    try:
        result = subprocess.run([PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(None), text=True,
                                timeout=180, **streams)
        os.close(terminal)
        drawn = b""
        with contextlib.suppress(OSError):  # EIO once the terminal's last writer is gone
            while chunk := os.read(controller, 65536):
                drawn += chunk
    finally:
        os.close(controller)
    return result, drawn


def test_verify_draws_a_progress_bar_on_a_terminal(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=1, rows=25)
    result, drawn = on_terminal("verify", "--database-url", db_url, "--cmk", cmk, stream="stderr")
    assert result.returncode == 0 and "verified 50 values: 50 ok, 0 failed" in result.stdout
    assert b"verify values" in drawn and b"50/50" in drawn  # tqdm, on stderr only


def test_export_escapes_control_characters_on_a_terminal_only(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    keys = KeyManager(engine, provider)
    keys.create_table()
    (table,) = data_tables(keys, 1)
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": 1, "name": "\x1b]0;owned\x07\u202eevil", "ssn": "1"}])
    args = ("export", "--database-url", db_url, "--cmk", cmk, "--table", "data_0", "--format", "jsonl")
    result, drawn = on_terminal(*args, stream="stdout")
    assert result.returncode == 0, result.stderr
    assert b"\x1b" not in drawn and b"\x07" not in drawn and "\u202e".encode() not in drawn
    assert b"\\u202eevil" in drawn
    piped = cli(*args)
    assert json.loads(piped.stdout) == {"id": 1, "name": "\x1b]0;owned\x07\u202eevil", "ssn": "1"}


def test_a_plain_binary_column_is_not_taken_for_encrypted(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    keys = KeyManager(engine, provider)
    keys.create_table()
    (table,) = data_tables(keys, 1)
    blobs = Table("blobs", table.metadata, Column("id", Integer, primary_key=True, autoincrement=False),
                  Column("data", LargeBinary), Column("name", EncryptedType(String(20), keys)))
    table.metadata.create_all(engine)
    # one value looks like an envelope (version 1, a key id, 40 bytes); the others do not
    shaped = bytes([fmt.VERSION_GCM]) + fmt.key_id_bytes(12345) + bytes(31)
    values = [shaped, b"\x89PNG\r\n\x1a\n" + bytes(40), b"plain text", shaped]
    with engine.begin() as conn:
        conn.execute(insert(blobs), [{"id": i, "data": v, "name": f"n{i}"} for i, v in enumerate(values)])
    verify = cli("verify", "--database-url", db_url, "--cmk", cmk, "--json")
    assert verify.returncode == 0, verify.stdout
    assert [(c["table"], c["column"]) for c in as_json(verify)["columns"]] == [("blobs", "name")]
    export = cli("export", "--database-url", db_url, "--cmk", cmk, "--table", "blobs", "--format", "jsonl")
    assert [json.loads(x) for x in export.stdout.splitlines()] == [
        {"id": i, "data": base64.b64encode(v).decode(), "name": f"n{i}"} for i, v in enumerate(values)]


# -- export -----------------------------------------------------------------------------------


def people_model(keys: KeyManager) -> Any:
    class Person(new_base()):
        __tablename__ = "people"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(EncryptedType(String(100), keys))
        age: Mapped[int] = mapped_column(EncryptedType(Integer, keys))
        balance: Mapped[Decimal] = mapped_column(EncryptedType(Numeric(10, 2), keys))
        born: Mapped[dt.date] = mapped_column(EncryptedType(Date, keys))
        active: Mapped[bool] = mapped_column(EncryptedType(Boolean, keys, deterministic=True))
        notes: Mapped[dict | None] = mapped_column(EncryptedType(JSON, keys, scope="row"))
        city: Mapped[str] = mapped_column(String(50))

    return Person


PEOPLE = [
    {"id": 1, "name": "Ada, \"the first\"", "age": 36, "balance": Decimal("1843.10"), "born": dt.date(1815, 12, 10),
     "active": True, "notes": {"allergies": ["penicillin"], "é": 1}, "city": "London"},
    {"id": 2, "name": "Alan\nTuring", "age": 41, "balance": Decimal("-0.50"), "born": dt.date(1912, 6, 23),
     "active": False, "notes": None, "city": "Wilmslow"},
    {"id": 3, "name": "Grace", "age": 85, "balance": Decimal("0.00"), "born": dt.date(1906, 12, 9),
     "active": True, "notes": {"n": [1, 2.5, None]}, "city": "Arlington"},
]
TYPES = ["--type", "age=Integer", "--type", "balance=Numeric", "--type", "born=Date", "--type", "active=Boolean",
         "--type", "notes=JSON"]


def test_export_csv_and_jsonl_round_trip(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    keys = KeyManager(engine, provider)
    keys.create_table()
    Person = people_model(keys)
    Person.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Person(**p) for p in PEOPLE])
        session.commit()
    base = ["export", "--database-url", db_url, "--cmk", cmk, "--table", "people", *TYPES]

    jsonl = cli(*base, "--format", "jsonl")
    assert jsonl.returncode == 0, jsonl.stderr
    as_read = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert as_read == [p | {"balance": str(p["balance"]), "born": p["born"].isoformat()} for p in PEOPLE]
    assert "exported 3 rows of people: 8 columns, 6 decrypted" in jsonl.stderr

    out = tmp_path / "people.csv"
    written = cli(*base, "--output", str(out), "--json")
    assert as_json(written) == {"command": "export", "table": "people", "rows": 3, "output": str(out), "erased": 0,
                                "columns": list(PEOPLE[0]), "decrypted": [c for c in PEOPLE[0] if c not in ("id", "city")]}
    assert out.stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))
    assert rows == [{k: "" if v is None else json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else str(v)
                     for k, v in p.items()} for p in PEOPLE]

    one = cli(*base, "--format", "jsonl", "--pk", "2", "--columns", "name,city")
    assert one.returncode == 0 and [json.loads(x) for x in one.stdout.splitlines()] == [
        {"name": "Alan\nTuring", "city": "Wilmslow"}]
    wrong = cli(*base, "--columns", "name,nope")
    assert wrong.returncode == 1 and wrong.stderr.strip() == "sa-envelope: error: table people has no column nope"


# -- rotate, reencrypt, shred ------------------------------------------------------------------


def test_rotate_then_reencrypt_off_the_old_keys(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=1, rows=30)
    (old,) = key_statuses(engine, "data_0")
    (old_det,) = key_statuses(engine, "data_0", kt.SCOPE_DETERMINISTIC)

    rotated = as_json(cli("rotate", "--database-url", db_url, "--cmk", cmk, "--table", "data_0", "--json"))
    assert rotated["table"] == "data_0" and rotated["key"] != fmt.format_key_id(old)
    assert key_statuses(engine, "data_0")[old] == kt.RETIRED

    for key_id in (old, old_det):
        done = cli("reencrypt", "--database-url", db_url, "--cmk", cmk, "--key", fmt.format_key_id(key_id),
                   "--json", "--batch-size", "7", "--grace", "1")  # no application process to wait for
        report = as_json(done)
        assert done.returncode == 0 and (report["reencrypted"], report["remaining"], report["failed"]) == (30, 0, 0)
    fresh = KeyManager(engine, provider, live=LivePolicy(ttl=0.5, grace=1.0))  # the grace the CLI was given
    assert read_all(engine, fresh, 1) == [[expected_row(i) for i in range(30)]]
    (table,) = data_tables(fresh, 1)
    with engine.connect() as conn:  # the deterministic column still answers equality
        assert conn.execute(select(table.c.id).where(table.c.ssn == "017-00-0000")).scalar_one() == 17
        heads = conn.execute(select(type_coerce(table.c.name, LargeBinary))).scalars().all()
    assert old not in {fmt.key_id_of(bytes(h)) for h in heads}
    again = cli("reencrypt", "--database-url", db_url, "--cmk", cmk, "--key", fmt.format_key_id(old))
    assert again.returncode == 0 and "0 re-encrypted, 0 failed, 0 remaining" in again.stdout


def test_shred_by_row_and_by_key_then_verify_counts_erased(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    keys = KeyManager(engine, provider)
    keys.create_table()
    Patient = row_scope_model(keys)
    Patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Patient(id=i, name=f"p{i}", notes={"i": i}, ssn=f"{i:03d}") for i in (1, 2, 3)])
        session.commit()
    refused = cli("shred", "--database-url", db_url, "--cmk", cmk, "--table", "patients", "--pk", "2")
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    by_row = as_json(cli("shred", "--database-url", db_url, "--cmk", cmk, "--table", "patients", "--pk", "2",
                         "--yes", "--json"))
    assert len(by_row["shredded"]) >= 1
    with engine.connect() as conn:
        raw = conn.execute(select(type_coerce(Patient.__table__.c.notes, LargeBinary))
                           .where(Patient.__table__.c.id == 3)).scalar_one()
    row_key = fmt.format_key_id(fmt.key_id_of(bytes(raw)))
    by_key = cli("shred", "--database-url", db_url, "--cmk", cmk, "--key", row_key, "--yes")
    assert by_key.returncode == 0 and f"shredded 1 keys of key {row_key}: {row_key}" in by_key.stdout

    verify = cli("verify", "--database-url", db_url, "--cmk", cmk)
    assert verify.returncode == 0, verify.stdout
    assert "patients.notes: 1 ok, 2 erased, 0 failed" in verify.stdout
    export = cli("export", "--database-url", db_url, "--cmk", cmk, "--table", "patients", "--format", "jsonl",
                 "--type", "notes=JSON")
    assert [json.loads(x) for x in export.stdout.splitlines()] == [
        {"id": 1, "name": "p1", "notes": {"i": 1}, "ssn": "001"},
        {"id": 2, "name": "p2", "notes": None, "ssn": None},
        {"id": 3, "name": "p3", "notes": None, "ssn": None},
    ]
    assert "4 erased values" in export.stderr


def test_keys_list_json(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, _ = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=1, rows=2)
    listing = as_json(cli("keys", "list", "--database-url", db_url, "--json"))
    assert listing["command"] == "keys list"
    assert sorted((k["table"], k["scope"], k["status"]) for k in listing["keys"]) == [
        ("data_0", "deterministic", "active"), ("data_0", "table", "active")]
    assert {k["wrapped_by"] for k in listing["keys"]} == {provider.wrapping_key_id}


# -- Ctrl-C -------------------------------------------------------------------------------------


def interrupted(tmp_path: Path, point: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI paused at ``point``; SIGINT once it is there."""
    marker = tmp_path / "paused"
    proc = subprocess.Popen([PYTHON, str(INTERRUPT), point, str(marker), *args], env=subprocess_env(None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_interrupted(result: subprocess.CompletedProcess[str], says: str) -> None:
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == [f"sa-envelope: interrupted: {says}"], result.stderr


def test_ctrl_c_during_a_rewrap_then_the_rerun_resumes(engine: Engine, db_url: str, tmp_path: Path) -> None:
    old, old_cmk = local(tmp_path, "old.key")
    new, new_cmk = local(tmp_path, "new.key")
    fill(engine, KeyManager(engine, old), tables=3, rows=5)
    args = ("rewrap", "--database-url", db_url, "--to", new_cmk, "--from", old_cmk, "--batch-size", "1")
    stopped = interrupted(tmp_path, "rewrap.batch.after_commit", *args)
    assert_interrupted(stopped, "every batch committed so far is kept: run the same command again to resume "
                                "where it stopped")
    moved = [r for r in provider_key_records(engine) if r.wrapping_key_id == new.wrapping_key_id]
    assert len(moved) == 1  # the one batch committed before Ctrl-C
    rerun = cli(*args)
    assert rerun.returncode == 0 and "5 re-wrapped, 1 already current, 0 failed" in rerun.stdout
    assert read_all(engine, KeyManager(engine, new), 3) == [[expected_row(i) for i in range(5)]] * 3


def test_ctrl_c_during_a_reencryption_then_the_rerun_resumes(engine: Engine, db_url: str, tmp_path: Path) -> None:
    provider, cmk = local(tmp_path)
    fill(engine, KeyManager(engine, provider), tables=1, rows=20)
    (old,) = key_statuses(engine, "data_0")
    args = ("reencrypt", "--database-url", db_url, "--cmk", cmk, "--key", fmt.format_key_id(old), "--batch-size", "5")
    assert_interrupted(interrupted(tmp_path, "reencrypt.batch.after_commit", *args),
                       "every batch committed so far is kept: run the same command again to resume where it stopped")
    rerun = cli(*args)
    assert rerun.returncode == 0 and "15 re-encrypted, 0 failed, 0 remaining" in rerun.stdout
    assert read_all(engine, KeyManager(engine, provider), 1) == [[expected_row(i) for i in range(20)]]


def test_ctrl_c_during_an_export(engine: Engine, db_url: str, tmp_path: Path) -> None:
    """The export blocks on a full stdout pipe (the reader stopped reading): SIGINT then."""
    provider, cmk = local(tmp_path)
    keys = KeyManager(engine, provider)
    keys.create_table()
    (table,) = data_tables(keys, 1)
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), [{"id": i, "name": "x" * 90, "ssn": f"{i % 1000:03d}"} for i in range(3000)])
    proc = subprocess.Popen([PYTHON, "-m", "sa_envelope", "export", "--database-url", db_url, "--cmk", cmk,
                             "--table", "data_0"], env=subprocess_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "id,name,ssn\n"  # it is writing rows
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_interrupted(result, "the export is incomplete (an --output file is left as it was): run it again")
    assert len(out.splitlines()) < 3000


# -- no database needed ---------------------------------------------------------------------------


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"sa-envelope {version('sa-envelope')}"


@pytest.mark.backends("sqlite")
def test_missing_driver_and_refused_connection_are_one_line(db_url: str, closed_port_url: str) -> None:
    missing = cli("verify", "--database-url", "postgresql+psycopg2://app@127.0.0.1/app", "--cmk", "alias/x")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        "sa-envelope: error: the database driver of postgresql+psycopg2 is not installed "
        "(No module named 'psycopg2'): pip install it"]
    refused = cli("keys", "list", "--database-url", "postgresql+psycopg://app@127.0.0.1:1/app", "--json")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "database error: OperationalError" in refused.stderr and "Traceback" not in refused.stderr
    assert as_json(refused)["error"].startswith("database error: OperationalError")
    bare = cli("export", "--database-url", db_url, "--table", "t", "--json")
    assert bare.returncode == 1 and "--output" in bare.stderr
    bad_type = cli("export", "--database-url", db_url, "--table", "t", "--type", "x=Blob")
    assert bad_type.returncode == 1 and "--type 'x=Blob'" in bad_type.stderr
    for shred in (["--key", "00"], ["--table", "t"], ["--key", "0000000000000001", "--table", "t", "--pk", "1"]):
        result = cli("shred", "--database-url", db_url, *shred, "--yes")
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr

