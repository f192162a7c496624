"""Workers of one job: threads of this process, coordinated by the database.

A job started with ``workers=N`` runs its batch loop in N threads. They
share nothing but the key store (so each key is unwrapped once, whatever
the number of workers: KMS calls follow keys, never rows or workers), a
progress bar and a throttle. Which rows each one takes is the database's
business (``FOR UPDATE SKIP LOCKED``, or disjoint primary-key partitions
chosen up front); there is no coordinator to fail. Each worker has its own
connection, so on two cores the database's share of the work runs in
parallel while the GIL holds the Python share.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

__all__ = ["SharedBar", "run_workers"]


class SharedBar:
    """A progress bar several workers update: one update at a time."""

    def __init__(self, bar: Any) -> None:
        self._bar, self._lock = bar, threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._bar.update(n)


def run_workers(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` for i in ``range(count)``, each in a thread (one:
    in this thread); wait for all, then re-raise the first failure."""
    if count < 1:
        raise ValueError("workers must be at least 1")
    if count == 1:
        work(0)
        return
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # re-raised in the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"sa-envelope-worker-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
