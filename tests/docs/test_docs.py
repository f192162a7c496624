"""The documentation's code runs: every ```python block, in order, of
getting-started.md, rotation.md (on a small database) and shredding.md."""

from __future__ import annotations

import functools
import re
import textwrap
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_envelope import AwsKmsProvider, EncryptedType, KeyManager, LivePolicy, RolloverPolicy
from sa_envelope.envelope import format as fmt
from sa_envelope.keys import table as kt
from support import DOCS
from support.models import patients_model
from support.rotation import key_statuses, provider_key_records


def python_blocks(page: str) -> list[str]:
    """The page's ```python blocks, a block inside a list item dedented."""
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)]


def test_getting_started_runs(
    kms_server: str, kms_admin: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = kms_admin.create_key()["KeyMetadata"]["KeyId"]
    kms_admin.create_alias(AliasName="alias/app-data", TargetKeyId=key_id)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_server)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks("getting-started.md")
    assert len(blocks) >= 5
    module = types.ModuleType("docs_getting_started")  # annotations resolve here
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        for block in blocks:
            exec(compile(block, "getting-started.md", "exec"), namespace)
        assert namespace["keys"].stats()["provider_calls"] == 2  # two table-level keys
        assert (tmp_path / ".sa_envelope" / "master.key").stat().st_size == 32
    finally:
        kms_admin.delete_alias(AliasName="alias/app-data")
        namespace["engine"].dispose()


@pytest.mark.backends("sqlite")
def test_rotation_runbook_python_examples_run(
    engine: Engine, kms_server: str, kms_admin: Any, cmk: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ```python block of docs/rotation.md, in order, on a small database."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", kms_server)
    target = kms_admin.create_key()["KeyMetadata"]["KeyId"]
    kms_admin.create_alias(AliasName="alias/app-data-2027", TargetKeyId=target)
    fast = functools.partial(KeyManager, live=LivePolicy(ttl=0.1, grace=1.0))  # the switch in seconds
    keys = fast(engine, AwsKmsProvider(cmk))
    keys.create_table()

    Patient = patients_model(
        name=EncryptedType(String(100), keys), notes=EncryptedType(String(100), keys),
        ssn=EncryptedType(String(11), keys, deterministic=True),
    )  # fmt: skip
    Patient.metadata.create_all(engine)
    with Session(engine) as session:
        session.add_all([Patient(id=i, name=f"n{i}", notes=f"x{i}", ssn=f"{i:03d}") for i in range(1, 21)])
        session.commit()
    (suspect,) = key_statuses(engine, "patients")
    (det,) = key_statuses(engine, "patients", kt.SCOPE_DETERMINISTIC)
    namespace: dict[str, Any] = {
        "keys": keys, "engine": engine, "Patient": Patient,
        "provider": AwsKmsProvider("alias/app-data-2027", previous=[cmk]),  # after the rewrap block
        "suspect_key_id": fmt.format_key_id(suspect), "AwsKmsProvider": AwsKmsProvider,
        "KeyManager": fast, "RolloverPolicy": RolloverPolicy, "old_det_key_id": fmt.format_key_id(det),
    }
    blocks = python_blocks("rotation.md")
    assert len(blocks) == 8
    try:
        for block in blocks:
            exec(compile(block, "rotation.md", "exec"), namespace)
    finally:
        kms_admin.delete_alias(AliasName="alias/app-data-2027")
    assert namespace["report"].reencrypted == 40
    assert not namespace["swept"].kept  # the sweep block: no rotation left in progress
    arn = kms_admin.describe_key(KeyId=target)["KeyMetadata"]["Arn"]
    assert {r.wrapping_key_id for r in provider_key_records(engine)} == {arn}
    with Session(engine) as session:
        assert [p.notes for p in session.query(Patient).order_by(Patient.id)] == [f"x{i}" for i in range(1, 21)]
        assert [p.id for p in session.query(Patient).filter(Patient.ssn == "007")] == [7]
    assert key_statuses(engine, "patients", kt.SCOPE_DETERMINISTIC)[det] == kt.RETIRED


def test_shredding_doc_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/shredding.md: every ```python block, in order (SQLite in tmp_path)."""
    blocks = python_blocks("shredding.md")
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("docs_shredding")  # annotations resolve here
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for block in blocks:
            exec(compile(block, "shredding.md", "exec"), module.__dict__)
        assert len(module.__dict__["shredded"]) == 1
    finally:
        if "engine" in module.__dict__:
            module.__dict__["engine"].dispose()
