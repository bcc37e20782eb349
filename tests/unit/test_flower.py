"""`courier flower`'s credentials and settings: basic auth (made once, kept, refused when damaged or
missing) and the management API's URL. Flower against the real RabbitMQ and a real worker is
tests/integration/test_flower.py.
"""
from __future__ import annotations

import os
import subprocess

import click
import pytest

from courier.tasks.flower import basic_auth, broker_api_url, check_basic_auth
from tests.support.processes import VENV_BIN


def test_the_management_api_url_comes_from_the_broker_url():
    assert broker_api_url("amqp://courier:s3cr%2Ft@rabbitmq:5672//") == "http://courier:s3cr%2Ft@rabbitmq:15672/api/"
    assert broker_api_url("amqps://u:p@mq.example:5671/vh") == "https://u:p@mq.example:15671/api/"


@pytest.mark.parametrize("value", [None, "", "admin", "admin:", ":pw", "a:b,c"])
def test_flower_refuses_missing_or_malformed_basic_auth(value):
    with pytest.raises(click.UsageError):
        check_basic_auth(value)
    check_basic_auth("admin:pw,ops:other")


def test_a_generated_credential_is_made_once_private_and_kept(tmp_path):
    env = {"FLOWER_AUTH_FILE": str(tmp_path / "instance" / "flower-auth")}
    value, generated = basic_auth(env)
    assert generated and value.startswith("courier:") and len(value.partition(":")[2]) >= 22  # 128 bits
    assert (tmp_path / "instance" / "flower-auth").stat().st_mode & 0o777 == 0o600
    assert basic_auth(env) == (value, True)  # the next start uses the same one
    assert basic_auth({"FLOWER_AUTH_FILE": str(tmp_path / "other")})[0] != value


def test_an_explicit_flower_basic_auth_wins_over_the_file(tmp_path):
    env = {"FLOWER_BASIC_AUTH": "ops:chosen", "FLOWER_AUTH_FILE": str(tmp_path / "flower-auth")}
    assert basic_auth(env) == ("ops:chosen", False)
    assert not (tmp_path / "flower-auth").exists()


def test_a_damaged_credential_file_is_refused_with_the_rule(tmp_path):
    (tmp_path / "flower-auth").write_text("no-colon-here\n")
    with pytest.raises(click.UsageError, match="user:password"):
        basic_auth({"FLOWER_AUTH_FILE": str(tmp_path / "flower-auth")})


def test_courier_flower_will_not_start_without_basic_auth():
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH_FILE")}
    result = subprocess.run([str(VENV_BIN / "courier"), "flower"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr and "no default password" in result.stderr
