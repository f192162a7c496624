"""Key-provider calls off the event loop, under asyncio.

With an ``AsyncEngine``, SQLAlchemy runs statements (and so bind and result
processing) inside a greenlet that hands each database wait back to the
event loop. A key-cache miss there calls the key provider, which is
blocking code (boto3). :func:`run_blocking` detects that greenlet and runs
the call in a worker thread (``asyncio.to_thread``) through SQLAlchemy's
``await_``, so the event loop keeps serving other tasks while KMS answers:
the task that needs the key waits; no other task does.
"""

from __future__ import annotations

import asyncio
from typing import Callable, TypeVar

from sqlalchemy.util.concurrency import await_, in_greenlet

__all__ = ["run_blocking"]

T = TypeVar("T")


def run_blocking(fn: Callable[[], T]) -> T:
    """Call ``fn``; inside an async statement, in a thread, not on the loop."""
    if in_greenlet():
        return await_(asyncio.to_thread(fn))
    return fn()
