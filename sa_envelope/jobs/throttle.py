"""A rows-per-second cap for jobs that run beside a live application.

``--rate`` bounds what a job adds to the database's load, over all its
workers together: each worker calls :meth:`Throttle.wait` with the rows its
batch handled, and sleeps until the job as a whole is back under the rate.
A job without a rate gets no throttle at all (no call per batch).
"""

from __future__ import annotations

import threading
import time

from ..errors import ConfigurationError

__all__ = ["Throttle"]


class Throttle:
    """At most ``rate`` items per second, shared by the threads that call it."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ConfigurationError("--rate must be a positive number of rows per second")
        self.rate = rate
        self._start = time.monotonic()
        self._done = 0
        self._lock = threading.Lock()

    def wait(self, items: int) -> None:
        """Account for ``items`` done; sleep until the job's average since it
        started is back under the rate."""
        with self._lock:
            self._done += items
            delay = self._start + self._done / self.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
