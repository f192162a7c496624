"""`sa-envelope demo` and `python -m sa_envelope demo` work offline and fast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("entry", ["module", "console"])
def test_demo_runs_offline(tmp_path: Path, entry: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("AWS_ENDPOINT_URL_KMS", None)
    cmd = [sys.executable, "-m", "sa_envelope"] if entry == "module" else [str(Path(sys.executable).parent / "sa-envelope")]
    if entry == "console" and not Path(cmd[0]).exists():
        pytest.fail("console script sa-envelope is not installed: run `make test`, which installs the package")
    out = subprocess.run(cmd + ["demo", "--dir", str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Ada Lovelace" in out.stdout and "sa_envelope_keys" in out.stdout
    assert "name=01 " in out.stdout and "ssn=02 " in out.stdout  # raw envelopes shown
    assert (tmp_path / "demo" / "master.key").stat().st_size == 32
