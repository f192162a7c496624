"""Key-provider calls off the event loop, under asyncio; greenlet optional.

With an ``AsyncEngine``, SQLAlchemy runs statements (and so bind and result
processing) inside a greenlet that hands each database wait back to the
event loop. A key-cache miss there calls the key provider, which is
blocking code (boto3). :func:`run_blocking` detects that greenlet and runs
the call in a worker thread (``asyncio.to_thread``) through SQLAlchemy's
await bridge, so the event loop keeps serving other tasks while KMS answers:
the task that needs the key waits; no other task does.

greenlet is only needed for asyncio (the ``sa-envelope[asyncio]`` extra):
a synchronous application never imports it, so :func:`run_blocking` first
asks whether anything imported greenlet at all. :func:`require_greenlet` is
the one place that says which extra to install when an ``AsyncEngine`` is
used without it. SQLAlchemy 2.0 names the bridge ``await_only``, 2.1
``await_``, and only 2.0.24 and later have ``in_greenlet``: all are handled.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from typing import Any, Callable, TypeVar, cast

from ..errors import ConfigurationError

__all__ = ["ASYNCIO_EXTRA", "require_greenlet", "run_blocking"]

T = TypeVar("T")
ASYNCIO_EXTRA = "sa-envelope[asyncio]"


def require_greenlet(what: str = "an AsyncEngine") -> None:
    """Raise a one-line ConfigurationError unless greenlet can be imported."""
    if "greenlet" not in sys.modules and importlib.util.find_spec("greenlet") is None:
        raise ConfigurationError(f"using {what} needs greenlet: pip install '{ASYNCIO_EXTRA}'")


def _in_async_statement() -> bool:
    """Whether this code runs inside SQLAlchemy's asyncio greenlet.

    SQLAlchemy imports greenlet before it spawns one, so a process where
    nothing imported it cannot be inside one: no import, no ImportError.
    """
    if "greenlet" not in sys.modules:
        return False
    from sqlalchemy.util import concurrency

    check = getattr(concurrency, "in_greenlet", None)
    if check is not None:
        return bool(check())
    import greenlet  # SQLAlchemy < 2.0.24 has no in_greenlet: its own test, inlined
    from sqlalchemy.util import _concurrency_py3k as py3k  # type: ignore[attr-defined,unused-ignore]

    return isinstance(greenlet.getcurrent(), py3k._AsyncIoGreenlet)


def _await(awaitable: Any) -> Any:
    """SQLAlchemy's sync-to-async bridge: ``await_`` (2.1) or ``await_only`` (2.0)."""
    from sqlalchemy.util import concurrency

    bridge = getattr(concurrency, "await_", None) or getattr(concurrency, "await_only")
    return bridge(awaitable)


def run_blocking(fn: Callable[[], T]) -> T:
    """Call ``fn``; inside an async statement, in a thread, not on the loop."""
    if _in_async_statement():
        return cast(T, _await(asyncio.to_thread(fn)))
    return fn()
