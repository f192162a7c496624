"""A failure-injection seam for the paths that write keys.

Key creation, rewrap and re-encryption call :func:`fault_point` before and
after each of their storage writes. In production nothing is installed and
the call is one global lookup. Tests install a hook with :func:`inject` that
raises (or kills the process) at a named point, then check that recovery
from that exact point loses nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

__all__ = ["fault_point", "inject"]

_hook: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """Mark a point where a test may inject a failure."""
    if _hook is not None:
        _hook(name)


@contextlib.contextmanager
def inject(hook: Callable[[str], None]) -> Iterator[None]:
    """Install ``hook`` (called with each point's name) for the duration."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous
