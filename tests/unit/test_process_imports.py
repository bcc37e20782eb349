"""What a process loads at start, for the peak-RSS target of issue 18 (docs/benchmarks.md, "Memory").

Every library a process imports stays in its RSS, and `make bench` sums RSS over web (gunicorn's
master and two workers), relay and worker: a library loaded where it is not needed is paid once per
process. Each check runs in a fresh interpreter, since this one has loaded everything already.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["flask", "sqlalchemy", "cryptography", "requests", "yaml", "marshmallow", "celery", "psycopg"]


def loaded(code: str, **env: str) -> list[str]:
    """Which of HEAVY are in sys.modules after `code` runs in a new interpreter (in the repository, as Procfile)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_gunicorns_master_loads_no_application_library(tmp_path):
    """Without preload_app the master only forks and watches: its RSS would count on top of each worker's."""
    code = "import runpy; runpy.run_path('deploy/gunicorn.conf.py')"
    assert loaded(code, PROMETHEUS_MULTIPROC_DIR=str(tmp_path)) == []


def test_the_app_without_an_encryption_key_loads_neither_cryptography_nor_requests(tmp_path):
    """cryptography when COURIER_ENCRYPTION_KEY is set, requests when a worker makes an HTTP adapter."""
    code = "from courier.app import create_app; create_app()"
    env = {"COURIER_CONFIG": "examples/courier.yml", "DATABASE_URL": f"sqlite:///{tmp_path}/c.db",
           "COURIER_ENCRYPTION_KEY": "", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    got = loaded(code, **env)
    assert "cryptography" not in got and "requests" not in got, got
    assert "flask" in got  # the probe did build the app


def test_an_encryption_key_still_loads_cryptography(tmp_path):
    code = ("from courier.app.store import crypto\n"
            "ring = crypto.parse_keys('" + "A" * 43 + "=')\n"
            "assert ring.unseal(ring.seal(b'x')) == b'x'")
    assert "cryptography" in loaded(code)
