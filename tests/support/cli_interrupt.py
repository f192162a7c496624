"""Run the real ``sa-envelope`` CLI in this process with a pause at one fault point.

``python cli_interrupt.py POINT MARKER ARGS...``: at the first call of fault
point POINT (say ``rewrap.batch.after_commit``), create the file MARKER and
sleep, so that a test knows the job is mid-way and sends SIGINT then. The
CLI's own ``main`` runs unchanged; the pause is the project's fault layer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sa_envelope import faults
from sa_envelope.cli import main


def run(point: str, marker: Path, argv: list[str]) -> int:
    def pause(name: str) -> None:
        if name == point and not marker.exists():
            marker.touch()
            time.sleep(120)  # interrupted by the test's SIGINT long before

    with faults.inject(pause):
        return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], Path(sys.argv[2]), sys.argv[3:]))
