"""Courier from its built wheel inside a host whose own top-level packages are `app`, `tasks` and `migrations`.

The committed tree (`git archive HEAD`, so what is tested is what is committed) is built with
`python -m build --wheel` and installed, with the extra the host needs (`[sql]`) and pytest, in a
fresh virtualenv. examples/embedded_host is copied out of the repository and its own tests
(examples/embedded_host/tests: both Alembic histories, one commit or none, the API under
/courier, delivery by embedded threads and by the host's Celery worker, Courier's console script)
run there, with the host folder as the current directory and no PYTHONPATH: the host's `app`,
`tasks` and `migrations` are the top-level ones and Courier is only ever `courier.*`.
The wheel, the virtualenv and the host copy are made once per test session.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ("app", "tasks", "adapters", "migrations")  # the source folders that install as courier.<part>
HOST_EXTRAS = "sql"  # PostgreSQL (psycopg); the supply room sends JSON only, so no [mllp]

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would point a child at the repository or its config."""
    drop = ("COURIER_", "FLASK_", "SUPPLYROOM_", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("DATABASE_URL", "BROKER_URL", "ERP_URL")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and not Path(p).resolve().is_relative_to(REPO))  # not the repo's .venv/bin
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def run(argv: list, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def committed(tmp_path_factory) -> Path:
    """HEAD's tree, extracted outside the checkout."""
    tree = tmp_path_factory.mktemp("wheel-host") / "src"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True,
                             timeout=60)
    assert archive.returncode == 0, archive.stderr.decode(errors="replace")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True, timeout=60)
    return tree


@pytest.fixture(scope="session")
def wheel(committed) -> Path:
    dist = committed.parent / "dist"
    run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, committed], committed, timeout=300)
    [built] = dist.glob("courier-*.whl")
    return built


@pytest.fixture(scope="session")
def host_venv(wheel) -> Path:
    """A fresh virtualenv with the wheel (and the host's extra) and pytest: nothing of the repository in it."""
    venv = wheel.parent.parent / "venv"
    run([sys.executable, "-m", "venv", venv], wheel.parent, timeout=120)
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         f"{wheel}[{HOST_EXTRAS}]", "pytest>=8.0"], wheel.parent, timeout=600)
    return venv


def test_the_wheel_holds_courier_only(committed, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    top = {n.split("/")[0] for n in names}
    assert not top & set(PARTS), f"top-level entries besides courier/: {sorted(top & set(PARTS))}"
    assert top == {"courier", dist_info}, sorted(top)
    for part in PARTS:
        assert f"courier/{part}/__init__.py" in names, part
        # Every committed module of each source folder is in the wheel, under courier/<part>/.
        committed_modules = {f"courier/{p.relative_to(committed).as_posix()}" for p in (committed / part).rglob("*.py")}
        missing = committed_modules - set(names)
        assert not missing, f"not in the wheel: {sorted(missing)}"
    versions = sorted(p.name for p in (committed / "migrations" / "versions").glob("*.py"))
    in_wheel = sorted(n.rsplit("/", 1)[1] for n in names if re.fullmatch(r"courier/migrations/versions/[^/]+\.py", n))
    assert versions and in_wheel == versions, f"migrations in the wheel: {in_wheel}, committed: {versions}"
    needed = {"courier/__init__.py", "courier/migrations/env.py", "courier/migrations/script.py.mako"}
    assert needed <= set(names), f"not in the wheel: {sorted(needed - set(names))}"
    # The operator console's templates and assets (package_data in setup.cfg).
    web = committed / "app" / "web"
    assets = {f"courier/app/web/{p.relative_to(web).as_posix()}" for folder in ("templates", "static")
              for p in (web / folder).rglob("*") if p.is_file()}
    assert assets and assets <= set(names), f"not in the wheel: {sorted(assets - set(names))}"
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(f"{dist_info}/top_level.txt").decode().split() == ["courier"]
        assert "courier = courier.tasks.cli:main" in zf.read(f"{dist_info}/entry_points.txt").decode()


def test_the_host_tests_pass_against_the_installed_wheel(committed, host_venv, tmp_path):
    host = tmp_path / "supply-room"  # a copy of the committed example, outside the repository
    subprocess.run(["cp", "-R", str(committed / "examples" / "embedded_host"), str(host)], check=True)
    assert not host.resolve().is_relative_to(REPO)
    assert {p.name for p in host.iterdir()} >= {"app", "tasks", "migrations", "tests", "alembic.ini"}
    started = time.monotonic()
    result = subprocess.run([str(host_venv / "bin" / "python"), "-m", "pytest", "-v", "-p", "no:cacheprovider"],
                            cwd=host, env=clean_env(), capture_output=True, text=True, timeout=600)
    output = f"{result.stdout}\n{result.stderr}"
    print(f"the host's tests ({time.monotonic() - started:.1f}s):\n{result.stdout[-2500:]}")
    assert result.returncode == 0, output
    summary = result.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, output
    assert not re.search(r"\d+ (failed|error|errors|skipped)\b", summary), output
