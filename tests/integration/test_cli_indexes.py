"""``sa-envelope verify --index``: search-index tokens checked from the command line.

Real subprocesses, every backend: a missing, a tampered and a stale token
are each reported with the table, the column, the index and the key id,
never a value; an index the token table holds but no ``--index`` describes
is listed as not checked; once repaired, verify exits 0. On PostgreSQL the
same for indexes kept in the rows' own token arrays (found by their column),
and an array no ``--index`` describes is listed as not checked, with its column.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Engine

from sa_envelope import KeyManager, LocalKeyProvider
from sa_envelope.keys import table as kt
from support.rotation import PYTHON, subprocess_env
from support.search import fill, search_models

NAME = "search_patients.name=prefix:max_length=4,bits=12"
NOTES = "search_patients.notes=substring:n=3,bits=12"
BORN = "search_patients.born=range:granularities=year/month/day,bits=12,type=date"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "sa_envelope", *args], env=subprocess_env(None), capture_output=True, text=True, timeout=180
    )


def _blind_key(engine: Engine, keys: KeyManager) -> str:
    t = keys.table
    with engine.connect() as conn:
        return f"{conn.execute(select(t.c.id).where(t.c.scope == kt.SCOPE_BLIND_INDEX)).scalar_one():016x}"


def test_verify_reports_missing_tampered_and_stale_tokens(engine: Engine, db_url: str, tmp_path: Path) -> None:
    cmk = f"local:{tmp_path / 'master.key'}"
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"))
    keys.create_table()
    Patient, twin = search_models(keys, storage="table")
    Patient.metadata.create_all(engine)
    data = fill(engine, Patient, twin, 200)
    key_id = _blind_key(engine, keys)
    assert cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", NAME, "--index", NOTES).returncode == 0

    t = keys.search_table
    with engine.begin() as conn:
        conn.execute(delete(t).where(t.c.row_key == "3", t.c.name == "notes/substring"))  # missing
        where = (t.c.row_key == "5", t.c.name == "name/prefix")
        have = set(conn.execute(select(t.c.token).where(*where)).scalars())
        forged = next(v for v in range(2048) if v not in have)  # tampered: a token its value does not give
        conn.execute(insert(t), [{"owner": "search_patients", "name": "name/prefix", "row_key": "5", "token": forged}])
        conn.execute(insert(t), [{"owner": "search_patients", "name": "notes/substring", "row_key": "999", "token": 1}])
    result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", NAME, "--index", NOTES)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"search index search_patients.notes notes/substring (key {key_id}): 200 rows, DIFFERS; 1 missing" in out
    assert "1 stale tokens of rows that do not exist" in out
    assert (
        f"search index search_patients.name name/prefix (key {key_id}): 200 rows, DIFFERS; 0 missing, 1 tampered" in out
    )
    assert "search index search_patients born/range: not checked (describe it with --index)" in out
    for row in data[:10]:  # never a value
        for value in (row["name"], row["notes"]):
            assert value is None or len(value) < 4 or value not in out

    result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--json", "--index", NAME, "--index", NOTES)
    (line,) = result.stdout.strip().splitlines()
    report: Any = json.loads(line)
    indexes = {r["index"]: r for r in report["indexes"]}
    assert (indexes["notes/substring"]["missing"], indexes["notes/substring"]["orphan_tokens"]) == (1, 1)
    assert indexes["notes/substring"]["rows_shown"] == ["3"] and indexes["name/prefix"]["rows_shown"] == ["5"]
    assert indexes["name/prefix"]["key_id"] == key_id and indexes["name/prefix"]["column"] == "name"
    assert report["unchecked_indexes"] == [{"table": "search_patients", "index": "born/range"}]

    keys.verify_index(Patient.__table__, fix=True)
    result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", NAME, "--index", NOTES, "--index", BORN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not checked" not in result.stdout and result.stdout.count(", ok; 0 missing, 0 tampered") == 3


@pytest.mark.backends("postgresql")  # array storage is PostgreSQL's
def test_verify_checks_indexes_kept_in_token_arrays(engine: Engine, db_url: str, tmp_path: Path) -> None:
    cmk = f"local:{tmp_path / 'master.key'}"
    keys = KeyManager(engine, LocalKeyProvider.from_file(tmp_path / "master.key"))
    keys.create_table()
    Patient, twin = search_models(keys, storage="array")
    Patient.metadata.create_all(engine)
    fill(engine, Patient, twin, 100)
    key_id = _blind_key(engine, keys)
    table = Patient.__table__
    assert cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", NAME, "--index", NOTES).returncode == 0
    with engine.begin() as conn:
        conn.execute(update(table).where(table.c.id == 3).values(notes_substring_tokens=None))  # missing
        conn.execute(text("UPDATE search_patients SET name_prefix_tokens = name_prefix_tokens || 4099 WHERE id = 5"))
    result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", NAME, "--index", NOTES)
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert f"search index search_patients.notes notes/substring (key {key_id}): 100 rows, DIFFERS; 1 missing" in out
    assert f"search index search_patients.name name/prefix (key {key_id}): 100 rows, DIFFERS; 0 missing, 1 tampered" in out
    # the range index's array is in the database, described by no --index: listed, with its column
    undescribed = "search index search_patients born/range (token array born_range_tokens): not checked"
    assert undescribed in out and out.count("not checked") == 1, out
    result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--json", "--index", NAME, "--index", NOTES)
    report: Any = json.loads(result.stdout)
    assert report["unchecked_indexes"] == [
        {"table": "search_patients", "index": "born/range", "column": "born_range_tokens"}
    ]
    keys.verify_index(table, fix=True)
    result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", NAME, "--index", NOTES, "--index", BORN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(", ok; 0 missing, 0 tampered") == 3 and "not checked" not in result.stdout


def test_a_bad_index_description_is_one_line(db_url: str, tmp_path: Path) -> None:
    cmk = f"local:{tmp_path / 'master.key'}"
    LocalKeyProvider.from_file(tmp_path / "master.key")
    for spec, says in [
        ("patients.name", "give TABLE.COLUMN=KIND"),
        ("patients.name=fuzzy", "KIND one of prefix, substring, range"),
        ("patients.name=prefix:n=3", "a prefix index takes no n"),
        ("patients.name=prefix:bits=many", "take whole numbers"),
        ("patients.name=prefix:normalizer=soundex", "normalizer 'soundex' is not one of"),
    ]:
        result = cli("verify", "--database-url", db_url, "--cmk", cmk, "--index", spec)
        assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
