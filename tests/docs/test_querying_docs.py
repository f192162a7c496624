"""The runnable example of docs/querying.md runs, and says what it claims."""

from __future__ import annotations

import re
import sys
import types

from support import DOCS

DOC = DOCS / "querying.md"


def test_querying_doc_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "docs/querying.md has one runnable example; other snippets are ```text"
    module = types.ModuleType("querying_doc")  # a real module: SQLAlchemy resolves
    sys.modules[module.__name__] = module      # Mapped[...] annotations through it
    try:
        code = compile(blocks[0], str(DOC), "exec", dont_inherit=True)
        exec(code, module.__dict__)  # its asserts are the test
    finally:
        del sys.modules[module.__name__]
