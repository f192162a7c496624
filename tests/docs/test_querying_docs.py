"""The runnable examples of docs/querying.md run, and say what they claim."""

from __future__ import annotations

import re
import sys
import types

from support import DOCS

DOC = DOCS / "querying.md"


def test_querying_doc_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 2, "docs/querying.md has two runnable examples (equality, search); other snippets are ```text"
    for number, block in enumerate(blocks):  # each on its own: a new engine, manager and base
        module = types.ModuleType(f"querying_doc_{number}")  # a real module: SQLAlchemy resolves
        sys.modules[module.__name__] = module  # Mapped[...] annotations through it
        try:
            code = compile(block, str(DOC), "exec", dont_inherit=True)
            exec(code, module.__dict__)  # its asserts are the test
        finally:
            del sys.modules[module.__name__]
