"""Run the real ``sa-envelope`` CLI in this process, held inside its first worker's start.

``python cli_spawn_held.py MODE LOG ARGS...``: each worker process the
command starts (multiprocessing's fork or spawn launch, whichever
jobs/processes.py chose) appends its pid to LOG.
Right after the first is launched, still inside the parent's start window
(where SIGINT is held: jobs/processes.py ``_start``):

* ``hold``: wait until a SIGINT is pending for this process, so that a
  test that reads LOG and sends SIGINT lands it exactly in that window. The
  wait is bounded: a SIGINT that is dropped instead of held (the bug this
  guards against) leaves the command to run on, and the test sees it finish
  instead of stopping;
* ``child``: send SIGINT to that worker alone, before its interpreter has
  run a line of ours (it starts with SIGINT blocked: the signal must wait,
  then stop it quietly, never as a traceback from its imports).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from multiprocessing import popen_fork, popen_spawn_posix

from sa_envelope.cli import main

HOLD = 60.0  # seconds at most


def run(mode: str, log: Path, argv: list[str]) -> int:
    for popen in (popen_fork.Popen, popen_spawn_posix.Popen):
        popen._launch = _held(popen._launch, mode, log)  # type: ignore[method-assign]
    return main(argv)


def _held(launch: Any, mode: str, log: Path) -> Any:
    """``launch`` (one start method's), then the log line and the hold or the signal."""

    def held(self: Any, process_obj: Any) -> None:
        launch(self, process_obj)  # a forked child never returns from it: this is the parent
        first = not log.exists()
        with log.open("a") as f:
            f.write(f"{self.pid}\n")
        if first and mode == "child":
            os.kill(self.pid, signal.SIGINT)
        if first and mode == "hold":
            hold()

    def hold() -> None:
        """Until SIGINT is pending here, or was taken by another thread and
        handed to the window's handler (which this passes it on to)."""
        window = signal.getsignal(signal.SIGINT)
        taken: list[int] = []

        def passed_on(signum: int, frame: Any) -> None:
            taken.append(signum)
            window(signum, frame)  # type: ignore[operator]

        if callable(window):  # not SIG_IGN: that one is left to drop the signal, as it would
            signal.signal(signal.SIGINT, passed_on)
        try:
            deadline = time.monotonic() + HOLD
            while not taken and signal.SIGINT not in signal.sigpending() and time.monotonic() < deadline:
                time.sleep(0.01)  # waiting for the test's SIGINT, not racing it
        finally:
            signal.signal(signal.SIGINT, window)

    return held


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
