"""Issue 21: DATABASE_URL with several PostgreSQL hosts and BROKER_URL with several brokers, without a server:
parsing, the check at start (naming the variable, never the password), what outage lines say, the relay's
LISTEN parameters, and which of kombu's connection errors is an outage. The same URLs against the real
servers: tests/integration/test_failover_urls.py."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
from celery.worker.consumer.consumer import CONNECTION_ERROR, CONNECTION_FAILOVER, CONNECTION_RETRY_STEP

from courier.app.config import load_settings
from courier.app.observability import Outage
from courier.app.service_urls import broker_hosts, database_hosts, database_url
from courier.app.settings import ConfigError
from courier.app.store.db import describe_url, make_engine, store_problem
from courier.tasks.celery_app import (_ConsumerConnectionErrors, broker_location, broker_problem, failing_over,
                                      publish_nacked)
from courier.tasks.flower import broker_api_url
from courier.tasks.relay import listen_conninfo

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
ENV = {"COURIER_CONFIG": str(REPO / "examples" / "courier.yml")}


# --- DATABASE_URL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected, hosts", [
    ("postgresql://courier:p%40ss@hostA:5432,hostB:5433/courier?target_session_attrs=read-write",
     "postgresql://courier:p%40ss@/courier?host=hostA%2ChostB&port=5432%2C5433&target_session_attrs=read-write",
     ["hostA:5432", "hostB:5433"]),
    ("postgresql://courier@hostA,hostB/courier", "postgresql://courier@/courier?host=hostA%2ChostB",
     ["hostA:5432", "hostB:5432"]),
    ("postgresql+psycopg://courier@[fd00::1]:5432,hostB/courier",
     "postgresql+psycopg://courier@/courier?host=fd00%3A%3A1%2ChostB&port=5432%2C", ["[fd00::1]:5432", "hostB:5432"]),
    # SQLAlchemy's own forms and single hosts are left as they are
    ("postgresql+psycopg://courier@/courier?host=hostA:5432&host=hostB:5433&target_session_attrs=read-write",
     None, ["hostA:5432", "hostB:5433"]),
    ("postgresql+psycopg://courier@/courier?host=hostA,hostB&port=5432,5433", None, ["hostA:5432", "hostB:5433"]),
    ("postgresql://courier@127.0.0.1:5432/courier", None, ["127.0.0.1:5432"]),
    ("postgresql://courier@/courier", None, []),
])
def test_database_url_multi_host_forms(given, expected, hosts):
    normalised = database_url(given)
    assert normalised == (expected or given)
    assert database_hosts(normalised) == hosts
    assert database_url(normalised) == normalised  # idempotent: make_engine and the check may both apply it


def test_sqlite_urls_are_untouched():
    assert database_url("sqlite:///instance/courier.db") == "sqlite:///instance/courier.db"


@pytest.mark.parametrize("url, says", [
    ("postgresql://courier:s3cret@hostA:5432,hostB:54x2/courier", "host 2 of its host list has port '54x2'"),
    ("postgresql://courier:s3cret@hostA:5432,,hostB/courier", "host 2 of its host list, '', is not host or host:port"),
    ("postgresql://courier:s3cret@hostA,hostB/courier?host=hostC", "names its hosts both before the database name"),
    ("postgresql+psycopg://courier:s3cret@hostA/courier?host=hostB:5432&host=hostC:5432",
     "names host hostA before the database name and others in ?host="),
    ("postgresql+psycopg://courier:s3cret@/courier?host=a,b,c&port=5432,5433", "names 3 hosts but 2 ports"),
    ("postgresql+psycopg://courier:s3cret@/courier?host=a:5432&host=b:99999", "host 2 of its host list has port"),
    ("postgresql+psycopg://courier:s3cret@/courier?host=a:5432&host=b:5433&port=5432", "one form"),
])
def test_malformed_database_url_is_refused_at_start_naming_it_without_password(url, says):
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**ENV, "DATABASE_URL": url})
    [problem] = caught.value.problems
    assert problem.startswith("environment: DATABASE_URL '")
    assert says in problem
    assert "s3cret" not in problem and "***" in problem


def test_a_database_url_sqlalchemy_cannot_parse_is_refused_without_password():
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**ENV, "DATABASE_URL": "postgresql://courier:s3cret@host:54x2/courier"})
    [problem] = caught.value.problems
    assert problem.startswith("environment: DATABASE_URL 'postgresql://courier:***@host:54x2/courier' is not a "
                              "database URL")
    assert "s3cret" not in problem


def test_valid_lists_pass_the_check_and_keep_the_given_url():
    url = "postgresql://courier@hostA:5432,hostB:5432/courier?target_session_attrs=read-write"
    brokers = "amqp://courier:pw@mq1:5672//;amqp://courier:pw@mq2:5672//;amqp://courier:pw@mq3:5672//"
    settings = load_settings(env={**ENV, "DATABASE_URL": url, "BROKER_URL": brokers})
    assert (settings.database_url, settings.broker_url) == (url, brokers)


def test_outage_lines_name_every_database_host_and_never_the_password():
    url = "postgresql://courier:s3cret@db1.example:5432,db2.example:6432/courier?target_session_attrs=read-write"
    engine = make_engine(url)
    try:
        assert describe_url(url) == ("PostgreSQL", "db1.example:5432,db2.example:6432/courier")
        assert describe_url(engine.url) == ("PostgreSQL", "db1.example:5432,db2.example:6432/courier")
    finally:
        engine.dispose()
    assert describe_url("postgresql://courier:s3cret@db1:5432/courier") == ("PostgreSQL", "db1:5432/courier")
    assert describe_url("postgresql://courier@/courier") == ("PostgreSQL", "the local socket/courier")


def test_an_outage_of_several_hosts_does_not_say_to_start_this_machines_server():
    from courier.app.observability import Outage
    from courier.app.store.db import StoreProblem

    for where, says in (("db1:5432,db2:5432/courier", "start one of them, or let the failover tool promote a standby"),
                        ("127.0.0.1:5432/courier", "start it with `pg_ctlcluster")):
        records = _Records()
        log = logging.getLogger(f"test.failover.hint.{where}")
        log.addHandler(records)
        try:
            Outage(log, "PostgreSQL", where, "every 1s").failed("connection refused",
                                                                 StoreProblem("connection refused", True).hint)
        finally:
            log.removeHandler(records)
        assert says in records.lines[0][1], records.lines
    records, log = _Records(), logging.getLogger("test.failover.hint.rabbitmq")
    log.addHandler(records)
    try:
        Outage(log, "RabbitMQ", "mq1:5672,mq2:5672", "every 2s").failed("connection refused", "start it with x")
    finally:
        log.removeHandler(records)
    assert "; start one of them; retrying" in records.lines[0][1], records.lines


@pytest.mark.parametrize("url", [
    "postgresql://courier:s3cret@127.0.0.1:5999,127.0.0.1:5432/courier?target_session_attrs=read-write",
    "postgresql+psycopg://courier:s3cret@/courier?host=127.0.0.1:5999&host=127.0.0.1:5432"
    "&target_session_attrs=read-write",
])
def test_relay_listen_connection_keeps_every_host_and_target_session_attrs(url):
    """Rendered back as a URL, `?host=a:5999&host=b:5432` would leave libpq only the last host, with its port
    glued on: the LISTEN connection is built from the parameters the engine's own connections get."""
    engine = make_engine(url)
    try:
        params = dict(item.split("=", 1) for item in listen_conninfo(engine).split())
    finally:
        engine.dispose()
    assert params["host"] == "127.0.0.1,127.0.0.1"
    assert params["port"] == "5999,5432"
    assert params["target_session_attrs"] == "read-write"
    assert (params["dbname"], params["user"], params["password"]) == ("courier", "courier", "s3cret")


def test_only_a_standby_answering_is_an_outage_that_waiting_fixes():
    import psycopg

    exc = psycopg.OperationalError('connection failed: connection to server at "10.0.0.2", port 5432 failed: '
                                   "server is in hot standby mode")
    problem = store_problem(exc)
    assert problem is not None and problem.retryable
    assert problem.reason == "only a read-only standby answers"


# --- BROKER_URL --------------------------------------------------------------------------------------

def test_broker_location_names_every_broker_of_the_list_without_credentials():
    assert broker_location("amqp://courier:s3cret@mq1:5672//;amqp://courier:s3cret@mq2:5673//;"
                           "amqps://courier:s3cret@mq3//") == "mq1:5672,mq2:5673,mq3:5671"
    assert broker_location("amqp://guest:guest@localhost:5672//") == "localhost:5672"
    assert broker_hosts("amqp://u:p@[fd00::1]:5672//") == ["[fd00::1]:5672"]


@pytest.mark.parametrize("url, says", [
    ("amqp://courier:s3cret@mq1:5672//;;amqp://courier:s3cret@mq2:5672//", "broker 2 of 3 is empty"),
    ("amqp://courier:s3cret@mq1:5672//;mq2", "broker 2 of 2 ('mq2') is not a URL"),
    ("amqp://courier:s3cret@mq1:56x2//", "'amqp://courier:***@mq1:56x2//' has a port that is not a number"),
    ("amqp://courier:s3cret@mq1//;amqp://courier:s3cret@mq2:56x2//", "broker 2 of 2"),
    (" ", "is empty"),
])
def test_malformed_broker_url_is_refused_at_start_naming_it_without_password(url, says):
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**ENV, "BROKER_URL": url})
    [problem] = caught.value.problems
    assert problem.startswith("environment: BROKER_URL ")
    assert says in problem
    assert "s3cret" not in problem


def test_flower_management_api_is_the_first_node_of_a_list():
    assert broker_api_url("amqp://courier:pw@mq1:5672//;amqp://courier:pw@mq2:5672//") == \
        "http://courier:pw@mq1:15672/api/"
    assert broker_api_url("amqp://courier:pw@mq1;amqp://courier:pw@mq2") == "http://courier:pw@mq1:15672/api/"


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[tuple[int, str]] = []

    def emit(self, record):
        self.lines.append((record.levelno, record.getMessage()))


def _connection_error(uri: str, next_step: str) -> logging.LogRecord:
    return logging.LogRecord("celery.worker.consumer.consumer", logging.ERROR, __file__, 1, CONNECTION_ERROR,
                             (uri, ConnectionRefusedError(111, "Connection refused"), next_step), None)


def test_worker_one_broker_of_the_list_down_is_a_warning_not_an_outage():
    """Celery's consumer says "Will retry using next failover." when kombu moves to the next broker at once;
    only a whole round of the list failing ("Trying again in 2.00 seconds...") is an outage."""
    records, log = _Records(), logging.getLogger("test.failover.outage")
    log.addHandler(records)
    broker_log = logging.getLogger("courier.broker")
    broker_log.addHandler(records)
    try:
        outage = Outage(log, "RabbitMQ", "mq1:5672,mq2:5672", "every 2-30s")
        errors = _ConsumerConnectionErrors(outage)
        assert errors.filter(_connection_error("amqp://courier:**@mq1:5672//", CONNECTION_FAILOVER)) is False
        assert not outage.down
        assert (logging.WARNING, "RabbitMQ at mq1:5672 is not reachable (connection refused); trying the next "
                                 "broker of BROKER_URL") in records.lines
        step = CONNECTION_RETRY_STEP.format(when="in 2.00 seconds", retries=1, max_retries=None)
        assert errors.filter(_connection_error("amqp://courier:**@mq2:5672//", step)) is False
        assert outage.down
        assert any(level == logging.ERROR and message.startswith("RabbitMQ at mq1:5672,mq2:5672 is not reachable")
                   for level, message in records.lines)
    finally:
        log.removeHandler(records)
        broker_log.removeHandler(records)


def test_failing_over_is_interval_zero_on_a_connection_with_alternates():
    from kombu import Connection

    listed = Connection("amqp://u:p@mq1:5672//;amqp://u:p@mq2:5672//")
    single = Connection("amqp://u:p@mq1:5672//")
    assert failing_over(listed, 0) and not failing_over(listed, 1.0)
    assert not failing_over(single, 0)


# --- the commands, run to completion ------------------------------------------------------------------

def _courier(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "courier"), *args], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_db_upgrade_every_host_down_one_line_names_all_hosts_and_no_password(closed_port):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))  # a second port that refuses connections
        second = other.getsockname()[1]
        url = f"postgresql://courier:s3cret-pw@127.0.0.1:{closed_port},127.0.0.1:{second}/courier" \
              "?target_session_attrs=read-write"
        result = _courier("db", "upgrade", "--wait", "0", env={"DATABASE_URL": url})
    assert result.returncode == 1
    assert f"PostgreSQL at 127.0.0.1:{closed_port},127.0.0.1:{second}/courier is not reachable (connection " \
           "refused)" in result.stderr, result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_config_check_refuses_a_malformed_host_list_naming_database_url():
    result = _courier("config", "check", env={**ENV, "DATABASE_URL": "postgresql://courier:s3cret@a:5432,b:54x2/c"})
    assert result.returncode == 1
    assert "environment: DATABASE_URL 'postgresql://courier:***@a:5432,b:54x2/c' host 2 of its host list has " \
           "port '54x2'" in result.stderr, result.stderr
    assert "s3cret" not in result.stderr


def test_a_nacked_publish_is_told_apart_from_an_outage():
    """A quorum queue's leader lost with its RabbitMQ node nacks the publishes in flight; kombu re-raises that
    as an OperationalError with an empty message. The relay publishes again (publish_nacked) instead of failing
    on the empty text (seen in make cluster-chaos: an IndexError, the claims kept until their lease)."""
    from amqp.exceptions import MessageNacked
    from kombu.exceptions import OperationalError

    try:
        try:
            raise MessageNacked()
        except MessageNacked as nack:
            raise OperationalError("") from nack
    except OperationalError as exc:
        assert publish_nacked(exc)
    assert not publish_nacked(OperationalError("connection refused"))
    assert broker_problem(OperationalError(""))[0] == "unreachable"  # no cause, no text
