"""The documentation's code runs: every ```python block, in order."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

DOCS = Path(__file__).parent.parent / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


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
