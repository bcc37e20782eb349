"""The real `courier` console script, run as an operator would: a subprocess with only the environment.

Tokens are checked against the run's PostgreSQL database (`pg_url`); the HTTP check uses
the Flask test client on the same database and the same config file.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from courier.app.store import tokens
from courier.app.store.models import ApiToken
from tests.support.config import write_config
from tests.support.services import BROKER_URL

REPO = Path(__file__).resolve().parents[2]
COURIER = REPO / ".venv" / "bin" / "courier"
EVENT = {"type": "service.completed", "id": "evt-cli-1", "occurred_at": "2026-11-21T10:00:00Z",
         "data": {"service": "US-ABD"}}


def courier(*args: str, config: Path, database_url: str, **extra_env: str) -> subprocess.CompletedProcess:
    exe = COURIER if COURIER.exists() else Path(sys.executable).with_name("courier")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "FLASK_"))}
    env.update(DATABASE_URL=database_url, COURIER_CONFIG=str(config), BROKER_URL=BROKER_URL, **extra_env)
    return subprocess.run([str(exe), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def assert_clean_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def token_rows(store) -> list[ApiToken]:
    with store.session() as session:
        return list(session.scalars(select(ApiToken)))


@pytest.fixture
def run(config_file, store):
    """`courier ...` against this run's database and the `lab`/`other` config; the store is truncated after."""
    def run(*args: str, config: Path = config_file, **extra_env: str) -> subprocess.CompletedProcess:
        return courier(*args, config=config, database_url=store.url, **extra_env)
    return run


@pytest.fixture
def broken_config(tmp_path):
    path = write_config(tmp_path / "broken.yml", {"billing": "http://127.0.0.1:9/billing"},
                        routes=[("lab", "*", ["billing", "nowhere"])], timeout="10 parsecs")
    lines = path.read_text().splitlines()
    timeout_line = next(i for i, line in enumerate(lines, 1) if "10 parsecs" in line)
    nowhere_line = next(i for i, line in enumerate(lines, 1) if "nowhere" in line)
    return path, timeout_line, nowhere_line


# --- config check -----------------------------------------------------------

def test_config_check_ok(run, config_file):
    result = run("config", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config_file}: ok (2 sources, 2 destinations, 1 routes)"


def test_config_check_broken_exits_1_with_one_line_per_problem(run, broken_config):
    path, timeout_line, nowhere_line = broken_config
    result = run("config", "check", config=path)
    assert result.returncode == 1
    assert_clean_failure(result)
    assert result.stderr.splitlines() == sorted(result.stderr.splitlines(), key=lambda p: int(p.split(":")[1]))
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{path}:{timeout_line}: destinations.billing.timeout: "), lines
    assert lines[1].startswith(f"{path}:{nowhere_line}: routes.0.to.1: unknown destination 'nowhere'"), lines


def test_config_check_file_option_overrides_courier_config(run, config_file, broken_config):
    path, timeout_line, _ = broken_config
    result = run("config", "check", "--file", str(path))  # COURIER_CONFIG is the good file
    assert result.returncode == 1
    assert f"{path}:{timeout_line}: " in result.stderr
    good = run("config", "check", "--file", str(config_file), config=path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"{config_file}: ok")


def test_config_check_missing_file(run, tmp_path):
    missing = tmp_path / "absent.yml"
    result = run("config", "check", config=missing)
    assert result.returncode == 1
    assert_clean_failure(result, f"{missing}: config file not found")


# --- tokens -----------------------------------------------------------------

def test_tokens_create_prints_a_working_token_and_stores_only_its_hash(run, store, client):
    result = run("tokens", "create", "--source", "lab", "--name", "lab interface engine")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n", "stdout must be the token alone (scripts capture it)"
    assert token.startswith("courier_") and len(token) > 40

    (row,) = token_rows(store)
    assert f"id: {row.id}" in result.stderr
    assert token not in result.stderr
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert (row.scope, row.source, row.name, row.revoked_at) == ("ingest", "lab", "lab interface engine", None)
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM courier_api_tokens")).mappings().one()
    secret_part = token.removeprefix("courier_")
    for column, value in stored.items():
        assert secret_part not in str(value), f"plaintext token stored in {column}"

    # it really works against the API, as source lab
    r = client.post("/api/v1/messages", data=json.dumps(EVENT), content_type="application/json",
                    headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.get_json()
    r = client.post("/api/v1/messages", data=json.dumps(EVENT), content_type="application/json",
                    headers={"Authorization": f"Bearer {token}x"})
    assert r.status_code == 401


def test_tokens_create_admin_needs_no_source(run, store):
    result = run("tokens", "create", "--scope", "admin")
    assert result.returncode == 0, result.stderr
    (row,) = token_rows(store)
    assert (row.scope, row.source) == ("admin", None)
    assert row.token_hash == hashlib.sha256(result.stdout.strip().encode()).hexdigest()


def test_tokens_create_ingest_without_source_is_refused(run, store):
    for args in (("tokens", "create"), ("tokens", "create", "--scope", "ingest")):
        result = run(*args)
        assert_clean_failure(result, "--source")
    assert token_rows(store) == []


def test_tokens_create_unknown_source_is_refused(run, store, config_file):
    result = run("tokens", "create", "--source", "pharmacy")
    assert_clean_failure(result, "'pharmacy'", str(config_file))
    assert token_rows(store) == []


def test_tokens_create_unknown_scope_is_refused(run, store):
    result = run("tokens", "create", "--source", "lab", "--scope", "root")
    assert_clean_failure(result, "root")
    assert token_rows(store) == []


def test_tokens_create_with_a_broken_config_reports_problems_not_a_traceback(run, store, broken_config):
    path, timeout_line, _ = broken_config
    result = run("tokens", "create", "--scope", "admin", config=path)
    assert result.returncode == 1
    assert_clean_failure(result, f"{path}:{timeout_line}: destinations.billing.timeout")
    assert token_rows(store) == []


def test_tokens_revoke_sets_revoked_at_and_the_token_stops_working(run, store, client):
    created = run("tokens", "create", "--source", "lab")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    (row,) = token_rows(store)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/v1/messages", data=json.dumps(EVENT), content_type="application/json",
                       headers=headers).status_code == 202

    result = run("tokens", "revoke", row.id)
    assert result.returncode == 0, result.stderr
    assert row.id in result.stdout
    (after,) = token_rows(store)
    assert after.revoked_at is not None
    # The API process trusts a token it checked for tokens.CACHE_SECONDS; the CLI is another
    # process, so the revocation reaches the API within that time, not at once.
    deadline = time.monotonic() + tokens.CACHE_SECONDS + 2
    while True:
        status = client.post("/api/v1/messages", data=json.dumps({**EVENT, "id": f"evt-cli-{time.monotonic()}"}),
                             content_type="application/json", headers=headers).status_code
        if status == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 401


def test_tokens_revoke_unknown_id_fails_clearly(run, store):
    result = run("tokens", "revoke", "00000000-0000-7000-8000-000000000000")
    assert result.returncode == 1
    assert_clean_failure(result, "no token with id 00000000-0000-7000-8000-000000000000")
