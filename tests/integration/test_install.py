"""The package as users install it (issue 13): the wheel alone in a fresh
venv, then the same on the minimum versions pyproject.toml declares.

Each venv is made once per module (a wheel build and a few pip installs,
about a minute in all); the application (tests/install_app.py) then runs in
two fresh processes per backend, the second reading through the key table
alone. Needs the package index that pip is configured with.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "tests" / "support" / "install_app.py"
DRIVERS = ["psycopg[binary]>=3.1", "pymysql>=1.1"]  # the user's own database drivers, not ours

pytestmark = pytest.mark.slow


def _run(*cmd: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # cwd: not the repository, whose build/ directory would shadow the `build` package
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT.parent)


def _check(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _check(_run(sys.executable, "-m", "build", "--wheel", "--outdir", out, ROOT))
    (found,) = out.glob("sa_envelope-*.whl")
    return found


def _venv(where: Path, *requirements: str | Path) -> Path:
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    _check(_run(python, "-m", "pip", "install", "--quiet", *[str(r) for r in requirements]))
    return python


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A venv with the wheel and no extras (then the drivers, which the wheel never needs)."""
    python = _venv(tmp_path_factory.mktemp("plain"), wheel)
    _check(_run(python, "-m", "pip", "install", "--quiet", *DRIVERS))
    return python


@pytest.fixture(scope="module")
def minimum(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A venv with the wheel on the declared floors (constraints/minimum.txt)."""
    return _venv(
        tmp_path_factory.mktemp("minimum"), wheel, *DRIVERS, "-c", ROOT / "constraints" / "minimum.txt"
    )


def _app_round_trip(python: Path, url: str, keyfile: Path, *kms: str, env: dict[str, str] | None = None) -> list[str]:
    """Write, then read in a fresh process; what the reader printed."""
    assert _check(_run(python, APP, url, keyfile, "write", *kms, env=env)).split()[:3] == ["ok", _dialect(url), "write"]
    out = _check(_run(python, APP, url, keyfile, "read", *kms, env=env)).split()
    assert out[:3] == ["ok", _dialect(url), "read"], out
    return out


def _dialect(url: str) -> str:
    name = url.split(":", 1)[0].split("+", 1)[0]
    return "mysql" if name == "mysql" else name


def test_wheel_alone_runs_an_app(plain: Path, db_url: str, tmp_path: Path) -> None:
    """No extras: a synchronous app writes and reads, never importing greenlet
    (SQLAlchemy 2.1 does not install it; 2.0 does on common platforms)."""
    assert "greenlet" not in _check(_run(plain, "-m", "pip", "list"))
    assert _app_round_trip(plain, db_url, tmp_path / "master.key")[3] == "no-greenlet"


@pytest.fixture(scope="module")
def with_kms(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A venv with the wheel and its ``kms`` extra (boto3)."""
    return _venv(tmp_path_factory.mktemp("kms"), f"sa-envelope[kms] @ {wheel.as_uri()}", *DRIVERS)


@pytest.mark.backends("sqlite", "postgresql")
def test_kms_extra_runs_the_app_on_kms(with_kms: Path, db_url: str, tmp_path: Path, kms_server: str, cmk: str) -> None:
    """The ``kms`` extra: the same app with keys wrapped by KMS (moto, over
    HTTP), the region from ``AWS_REGION`` as the docs say."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_DEFAULT_REGION"}
    env.update(AWS_REGION="us-east-1", AWS_ENDPOINT_URL_KMS=kms_server)
    assert _app_round_trip(with_kms, db_url, tmp_path / "unused.key", cmk, env=env)[3] == "no-greenlet"
    assert not (tmp_path / "unused.key").exists()


def test_minimum_versions_run_the_app(minimum: Path, db_url: str, tmp_path: Path) -> None:
    versions = _check(_run(minimum, "-c", "import sqlalchemy, cryptography; print(sqlalchemy.__version__, cryptography.__version__)"))
    floors = dict(line.split("==") for line in (ROOT / "constraints" / "minimum.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    assert versions.split() == [floors["sqlalchemy"], floors["cryptography"]]
    _app_round_trip(minimum, db_url, tmp_path / "master.key")


OPTIONAL = {
    "kms": "from sa_envelope import AwsKmsProvider\nAwsKmsProvider('alias/app').resolve()",
    "alembic": "import sa_envelope.alembic",
    "progress": "from sa_envelope.jobs.progress import progress_bar\nprogress_bar(1, 'rows', enabled=True)",
    # SQLAlchemy 2.1 refuses to import sqlalchemy.ext.asyncio without greenlet (naming
    # sqlalchemy[asyncio]); 2.0 lets an AsyncEngine be made, and KeyManager then asks this.
    "asyncio": "from sa_envelope.keys.offload import require_greenlet\nrequire_greenlet()",
}


@pytest.mark.parametrize("extra", sorted(OPTIONAL))
def test_optional_part_without_its_extra_names_it(plain: Path, extra: str) -> None:
    """Each optional part, used without its extra: one line naming the extra."""
    script = "from sa_envelope import ConfigurationError\ntry:\n" + "".join(
        f"    {line}\n" for line in OPTIONAL[extra].splitlines()
    ) + "except ConfigurationError as exc:\n    print(exc)\nelse:\n    print('no error')\n"
    out = _check(_run(plain, "-c", script)).strip()
    assert out.count("\n") == 0 and f"pip install 'sa-envelope[{extra}]'" in out, out
