"""docs/writes.md: every ```python block runs, in order, on SQLite (its upsert
example uses ``sqlite.insert``; tests/integration/test_write_paths.py runs
every path on every backend)."""

from __future__ import annotations

import os
import re
import sys
import types
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from sa_envelope import KeyManager, LocalKeyProvider
from support import DOCS


@pytest.mark.backends("sqlite")
def test_writes_doc_runs(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "writes.md").read_text(), flags=re.S)
    assert len(blocks) == 2
    keys = KeyManager(engine, LocalKeyProvider(os.urandom(32)))
    keys.create_table()
    module = types.ModuleType("docs_writes")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict[str, Any] = module.__dict__
    namespace.update(keys=keys, engine=engine)
    for block in blocks:
        exec(compile(block, "writes.md", "exec"), namespace)
    t = keys.table
    with engine.connect() as conn:  # three rows with notes, one key each: none made twice
        scopes = [r[0] for r in conn.execute(t.select().with_only_columns(t.c.scope))]
    assert scopes.count("row") == 3
