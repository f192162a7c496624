"""Every ```python block of docs/raw-sql.md runs, in order, on every backend."""

from __future__ import annotations

import re
import sys
import types

import pytest
from sqlalchemy.engine import Engine

from support import DOCS

DOC = DOCS / "raw-sql.md"


def test_raw_sql_doc_runs(engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 5
    monkeypatch.setenv("DATABASE_URL", db_url)
    module = types.ModuleType("raw_sql_doc")  # a real module: SQLAlchemy resolves Mapped[...] through it
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for block in blocks:
        exec(compile(block, str(DOC), "exec", dont_inherit=True), module.__dict__)  # its asserts are the test
    assert module.__dict__["stored_frame"]["name"].tolist() == ["Ada", "Alan"]
