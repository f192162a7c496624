"""Keeps ``benchmarks/workers.py`` from rotting: one round at a trivial size.

It runs the real ``sa-envelope reencrypt`` with 1 and 2 workers, and with 2
workers of ``--against`` (this checkout again), on a database of the run's
own, KMS on moto. No timing is asserted; what is checked is that every run
moved every row with the KMS calls it should make (2 per process: the old
and the new key), and that the summary table lists each variant.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support.rotation import PYTHON, ROOT, subprocess_env


@pytest.mark.backends("postgresql", "mysql")
def test_workers_benchmark_runs_one_round(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    args = ["-m", "benchmarks.workers", "--url", db_url, "--rows", "400", "--rounds", "1",
            "--against", str(ROOT), "--json", str(log)]  # fmt: skip
    done = subprocess.run([PYTHON, *args], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["variant"], r["workers"], r["rows"]) for r in runs] == [
        ("1 worker", 1, 400), ("2 workers", 2, 400), (f"2 workers of {ROOT}", 2, 400)]  # fmt: skip
    assert [r["kms_calls"] for r in runs] == [2, 4, 4]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table] == ["| 1 worker", "| 2 workers", f"| 2 workers of {ROOT}"]
