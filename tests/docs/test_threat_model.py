"""docs/threat-model.md: every test its "What the tests prove" table names
exists, and its retry-policy example runs."""

from __future__ import annotations

import re
from typing import Any

import pytest

from support import DOCS, ROOT

DOC = DOCS / "threat-model.md"
SECTION = "## What the tests prove"


def _references() -> list[tuple[str, str | None]]:
    """``(file, test name or None)`` for every backticked reference in the
    section's tables; ``::name`` alone refers to the last file named."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index(SECTION) : text.index("\n## ", text.index(SECTION) + 1)]
    refs, current = [], None
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        for token in re.findall(r"`([^`]*(?:\.py|::test_\w+)[^`]*)`", line):
            path, _, name = token.partition("::")
            if path:
                current = path if path.startswith("tests/") else f"tests/{path}"
            assert current is not None, token
            refs.append((current, name or None))
    return refs


def test_every_test_the_threat_model_names_exists() -> None:
    refs = _references()
    assert len(refs) > 40
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.exists() or (name and not re.search(rf"^(async )?def {name}\(", file.read_text(), re.M)):
            missing.append(f"{path}::{name}" if name else path)
    assert missing == []


@pytest.mark.reliability
def test_threat_model_retry_example_runs() -> None:
    """The retry-policy example of docs/threat-model.md runs as written (offline)."""
    doc = (DOCS / "threat-model.md").read_text(encoding="utf-8")
    (example,) = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    scope: dict[str, Any] = {}
    exec(example, scope)
    client = scope["provider"].client
    assert client.meta.config.retries == {"mode": "adaptive", "total_max_attempts": 8}
    assert client.meta.config.read_timeout == 5
