"""A failure-injection seam for the paths that write keys and move data.

Key creation, roll-over, shredding and the batched jobs call
:func:`fault_point` before and after each of their storage writes. Every
name is declared once, in :data:`POINTS`: :func:`fault_point` refuses any
other, and the crash tests read the registry to know which points exist and
that each has a scenario. In production nothing is installed and the call is
a set lookup and one global lookup. Tests install a hook with :func:`inject`
that raises (or kills the process) at a named point, then check that
recovery from that exact point loses nothing.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

__all__ = ["POINTS", "batch_points", "fault_point", "inject"]


def batch_points(job: str) -> tuple[str, str]:
    """The two points the batched-job runner calls around each commit."""
    return f"{job}.batch.before_commit", f"{job}.batch.after_commit"


POINTS: frozenset[str] = frozenset(
    {
        "key.create.before_insert",
        "key.create.after_insert",
        "rollover.before_retire",
        "rollover.after_retire",
        "rowkey.create.before_insert",
        "rowkey.create.after_insert",
        "shred.before_update",
        "shred.after_update",
        "rewrap.key.before_update",
        "rewrap.key.after_update",
        *batch_points("rewrap"),
        "reencrypt.row.before_update",
        "reencrypt.row.after_update",
        *batch_points("reencrypt"),
        *batch_points("sweep"),
        "backfill.batch.before_update",  # jobs.backfill: after the range's cursor moved
        "backfill.batch.after_update",
        *(
            point
            for job in ("encrypt_column", "decrypt_column")
            for point in (
                f"{job}.batch.before_update",
                f"{job}.batch.after_update",
                *batch_points(job),
                f"{job}.before_swap",
                f"{job}.after_swap",
            )
        ),
    }
)

_hook: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """Mark a point where a test may inject a failure (``name`` in :data:`POINTS`)."""
    if name not in POINTS:
        raise ValueError(f"undeclared fault point {name!r}: add it to sa_envelope.faults.POINTS")
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
