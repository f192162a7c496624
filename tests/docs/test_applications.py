"""docs/applications.md runs: its models, the Flask app factory (Flask's test
client) and the FastAPI app (FastAPI's TestClient), each made twice on two
databases of the backend, whose keys must stay in their own database."""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import LargeBinary, create_engine, select, type_coerce
from sqlalchemy.engine import Engine

from sa_envelope.envelope import format as fmt
from support import DOCS
from support.backends import async_url
from support.databases import second_database

PATIENT = {"name": "Ada Lovelace", "ssn": "123-45-6789", "notes": {"allergies": ["penicillin"]}}


@pytest.fixture
def page(kms_server: str, kms_admin: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The page's blocks (models, Flask, FastAPI), with ``alias/app-data`` on moto."""
    key_id = kms_admin.create_key()["KeyMetadata"]["KeyId"]
    kms_admin.create_alias(AliasName="alias/app-data", TargetKeyId=key_id)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_server)
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "applications.md").read_text(), flags=re.S)
    assert len(blocks) == 3
    try:
        yield blocks
    finally:
        kms_admin.delete_alias(AliasName="alias/app-data")


def run_blocks(blocks: list[str], name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run the blocks as one fresh module (a new process's import of the models)."""
    module = types.ModuleType(name)  # annotations (and FastAPI's) resolve here
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, "applications.md", "exec"), module.__dict__)
    return module.__dict__


def envelopes(url: str, namespace: dict[str, Any]) -> tuple[set[int], set[int]]:
    """(key ids the stored values name, key ids of that database's key table)."""
    Patient, keys = namespace["Patient"], namespace["keys"]
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            cols = [type_coerce(Patient.__table__.c[c], LargeBinary()) for c in ("name", "ssn", "notes")]
            named = {fmt.key_id_of(bytes(v)) for row in conn.execute(select(*cols)) for v in row}
            stored = set(conn.execute(select(keys.table.c.id)).scalars())
    finally:
        engine.dispose()
    return named, stored


def check_database(url: str, namespace: dict[str, Any]) -> set[int]:
    named, stored = envelopes(url, namespace)
    assert named and named <= stored  # every value is an envelope under a key of its own database
    return stored


def test_flask_factory(db_url: str, tmp_path: Path, page: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ns = run_blocks(page[:2], "docs_applications_flask", monkeypatch)
    with second_database(db_url, tmp_path) as other_url:
        apps = [ns["create_app"](url) for url in (db_url, other_url)]
        try:
            for i, app in enumerate(apps):
                client = app.test_client()
                created = client.post("/patients", json={**PATIENT, "name": f"patient {i}"})
                assert created.status_code == 201
                pid = created.get_json()["id"]
                got = client.get(f"/patients/{pid}").get_json()
                assert got == {"id": pid, "name": f"patient {i}", "notes": PATIENT["notes"]}
                assert client.get("/patients", query_string={"ssn": PATIENT["ssn"]}).get_json() == [pid]
                assert client.get("/patients/999").status_code == 404
            ids = [check_database(url, ns) for url in (db_url, other_url)]
            assert ids[0] != ids[1]
        finally:
            for app in apps:
                engine: Engine = app.extensions["engine"]
                engine.dispose()


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_fastapi_app(db_url: str, tmp_path: Path, page: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    ns = run_blocks([page[0], page[2]], "docs_applications_fastapi", monkeypatch)

    with second_database(db_url, tmp_path) as other_url:
        for i, url in enumerate((db_url, other_url)):
            with TestClient(ns["create_api"](async_url(url))) as client:
                created = client.post("/patients", json={**PATIENT, "name": f"patient {i}"})
                assert created.status_code == 201
                pid = created.json()["id"]
                assert client.get(f"/patients/{pid}").json() == {
                    "id": pid,
                    "name": f"patient {i}",
                    "notes": PATIENT["notes"],
                }
                assert client.get("/patients", params={"ssn": PATIENT["ssn"]}).json() == [pid]
                assert client.get("/patients/999").status_code == 404
        ids = [check_database(url, ns) for url in (db_url, other_url)]
        assert ids[0] != ids[1]
        assert len(ns["keys"].engines) == 2
