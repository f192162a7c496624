"""Helpers shared across the test suite (imported as ``support.*``: pytest puts
tests/ on ``sys.path`` for the root conftest.py).

``TESTS`` is the tests/ folder, ``ROOT`` the repository (the worktree) and
``DOCS`` its docs/ folder, whatever folder a test module sits in.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
DOCS = ROOT / "docs"
