"""The routing file and the environment: everything wrong is refused with `file:line: path: message`.

These run `courier.app.settings` in-process against real files under tmp_path; no database or broker.
"""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from courier.app.settings import ConfigError, Source, parse_duration
from courier.app.config import load_routing, load_settings

REPO = Path(__file__).resolve().parents[2]

# A valid file; each bad case below replaces one line of it. Block style, so every key has its own line.
BASE = textwrap.dedent("""\
    sources:
      lab:
        allowed_types: ["HL7v2:ADT^*", "service.completed"]
        mllp_allow: ["127.0.0.1/32", "10.0.0.0/8"]
      other: {}
    destinations:
      billing:
        url: "http://127.0.0.1:9/billing"
        owner: revenue-cycle
        clearance: phi
        transform: passthrough
        timeout: 10s
        retry:
          max_attempts: 3
          initial: 1s
          max: 1m
        circuit:
          failure_threshold: 5
          open_for: 30s
      erp:
        url: "file:///tmp/courier-test-erp"
        clearance: phi  # no transform: gets messages as received, so only if cleared for PHI
    routes:
      - match: {source: lab, type: "service.completed"}
        to: [billing, erp]
    """)


def write(tmp_path: Path, text: str, name: str = "courier.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    """1-based number of the only line containing `fragment`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if fragment in line]
    assert len(hits) == 1, f"{fragment!r} is on lines {hits}"
    return hits[0]


def problems_of(path: Path, env: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_routing(path, env or {})
    assert info.value.problems, "ConfigError without problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_base_file_is_valid(tmp_path):
    r = load_routing(write(tmp_path, BASE), {})
    billing = r.destinations["billing"]
    assert (billing.clearance, billing.transform, billing.timeout) == ("phi", "passthrough", 10.0)
    assert (billing.retry.max_attempts, billing.retry.initial, billing.retry.max) == (3, 1.0, 60.0)
    assert (billing.circuit.failure_threshold, billing.circuit.open_for) == (5, 30.0)
    erp = r.destinations["erp"]  # the rest left out takes the documented defaults (clearance: test_transforms.py)
    assert (erp.clearance, erp.transform, erp.timeout, erp.retry.max_attempts) == ("phi", None, 10.0, 8)
    assert r.sources["lab"].mllp_allow == ("127.0.0.1/32", "10.0.0.0/8")
    assert r.sources["other"].allowed_types == ("*",)
    assert r.path == str(tmp_path / "courier.yml")


BAD_LINES = [
    # (line in BASE, replacement, dotted path, words the message must contain)
    pytest.param('    url: "http://127.0.0.1:9/billing"', '    url: "ftp://files.example/in"',
                 "destinations.billing.url", ["ftp"], id="unknown-scheme"),
    pytest.param('    url: "http://127.0.0.1:9/billing"', '    url: "billing.example/no-scheme"',
                 "destinations.billing.url", ["scheme"], id="no-scheme"),
    pytest.param("    to: [billing, erp]", "    to: [billing, warehouse]",
                 "routes.0.to.1", ["unknown destination", "warehouse"], id="route-to-unknown-destination"),
    pytest.param('  - match: {source: lab, type: "service.completed"}',
                 '  - match: {source: pharmacy, type: "service.completed"}',
                 "routes.0.match.source", ["pharmacy"], id="route-from-unknown-source"),
    pytest.param("    timeout: 10s", "    timeout: 10 parsecs",
                 "destinations.billing.timeout", ["10 parsecs"], id="duration-parsecs"),
    pytest.param("      initial: 1s", "      initial: -5s",
                 "destinations.billing.retry.initial", ["-5s"], id="duration-negative"),
    pytest.param("      open_for: 30s", "      open_for: soon",
                 "destinations.billing.circuit.open_for", ["soon"], id="duration-word"),
    pytest.param("      max: 1m", "      max: .inf",
                 "destinations.billing.retry.max", ["inf"], id="duration-infinite"),
    pytest.param("      max_attempts: 3", "      max_attempts: 0",
                 "destinations.billing.retry.max_attempts", [], id="max-attempts-zero"),
    pytest.param("    transform: passthrough", "    transform: charge_from_nowhere",
                 "destinations.billing.transform", ["charge_from_nowhere"], id="unknown-transform"),
    pytest.param("    transform: passthrough", '    transform: "courier_no_such_pkg.charges:convert"',
                 "destinations.billing.transform", ["courier_no_such_pkg"], id="unimportable-module"),
    pytest.param("    transform: passthrough", '    transform: "json:no_such_function"',
                 "destinations.billing.transform", ["json:no_such_function"], id="missing-function"),
    pytest.param("    retry:", "    retyr:",
                 "destinations.billing.retyr", ["Unknown field"], id="typo-key"),
    pytest.param("routes:", "rotues:", "rotues", ["Unknown field"], id="typo-top-level-key"),
    pytest.param("    clearance: phi", "    clearance: top-secret",
                 "destinations.billing.clearance", ["phi", "limited", "deidentified"], id="bad-clearance"),
    pytest.param('    mllp_allow: ["127.0.0.1/32", "10.0.0.0/8"]', '    mllp_allow: ["127.0.0.1/32", "10.0.0.0/33"]',
                 "sources.lab.mllp_allow.1", ["10.0.0.0/33"], id="bad-cidr"),
    pytest.param('    mllp_allow: ["127.0.0.1/32", "10.0.0.0/8"]', '    mllp_allow: ["lab.example.org"]',
                 "sources.lab.mllp_allow.0", ["lab.example.org"], id="hostname-not-cidr"),
]


@pytest.mark.parametrize("old, new, where, words", BAD_LINES)
def test_one_mistake_is_one_problem_naming_file_line_and_path(tmp_path, old, new, where, words):
    assert BASE.count(old + "\n") == 1
    text = BASE.replace(old + "\n", new + "\n")
    path = write(tmp_path, text)
    problems = problems_of(path)
    # Exactly one problem: a mistake in one section must not cause false alarms in another.
    assert len(problems) == 1, problems
    prefix = f"{path}:{line_of(text, new.strip())}: {where}: "
    assert problems[0].startswith(prefix), (problems[0], prefix)
    message = problems[0][len(prefix):]
    assert message.strip()
    for word in words:
        assert word in message, (word, message)


def test_destination_name_that_cannot_be_a_queue_is_refused(tmp_path):
    text = BASE.replace("  erp:\n", '  "erp/ledger":\n').replace("[billing, erp]", '[billing, "erp/ledger"]')
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}:{line_of(text, 'erp/ledger' + chr(34) + ':')}: destinations.erp/ledger: "
        "destination names are 1-64 letters, digits, '.', '_' or '-' (they name queues)"]


def test_several_problems_are_all_reported_sorted_by_line(tmp_path):
    # routes first in the file: their (cross-reference) problems are found last but must sort first.
    text = textwrap.dedent("""\
        routes:
          - match: {source: lab}
            to: [billing, nowhere]
        sources:
          lab:
            mllp_allow: ["999.1.1.1/8", "10.0.0.0/8", "::1/129"]
        destinations:
          billing:
            url: "ftp://billing.example/"
            timeout: 10 parsecs
            retyr: {max_attempts: 3}
            transform: no_such_transform
          erp:
            url: "file:///tmp/courier-test-erp"
            clearance: secret
            retry: {initial: -5s}
        """)
    path = write(tmp_path, text)
    problems = problems_of(path)
    expected = [
        (3, "routes.0.to.1"),
        (6, "sources.lab.mllp_allow.0"),
        (6, "sources.lab.mllp_allow.2"),
        (9, "destinations.billing.url"),
        (10, "destinations.billing.timeout"),
        (11, "destinations.billing.retyr"),
        (12, "destinations.billing.transform"),
        (15, "destinations.erp.clearance"),
        (16, "destinations.erp.retry.initial"),
    ]
    got = []
    for problem in problems:
        m = re.fullmatch(rf"{re.escape(str(path))}:(\d+): ([\w./-]+): (.+)", problem)
        assert m, problem
        got.append((int(m.group(1)), m.group(2)))
    assert sorted(got) == expected, problems  # every problem, none extra
    assert [line for line, _ in got] == [line for line, _ in expected], "not sorted by line"


def test_invalid_yaml_names_the_line_of_the_syntax_error(tmp_path):
    text = BASE.replace("    owner: revenue-cycle\n", "    owner: revenue: cycle\n")
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:{line_of(text, 'revenue: cycle')}: not valid YAML"), problems


def test_unclosed_bracket_is_invalid_yaml(tmp_path):
    path = write(tmp_path, BASE.replace("[billing, erp]", "[billing, erp"))
    (problem,) = problems_of(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: not valid YAML", problem), problem


def test_a_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = write(tmp_path, "- billing\n- erp\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:1: ")


def test_missing_file_is_one_clear_problem(tmp_path):
    path = tmp_path / "nowhere" / "courier.yml"
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: ")
    assert "not found" in problem and "COURIER_CONFIG" in problem


def test_empty_file_is_an_empty_config(tmp_path):
    r = load_routing(write(tmp_path, ""), {})
    assert (dict(r.sources), dict(r.destinations), r.routes) == ({}, {}, ())


# --- ${VAR} expansion -------------------------------------------------------

def test_missing_env_var_is_refused_naming_line_path_and_variable(tmp_path):
    text = BASE.replace('"http://127.0.0.1:9/billing"', '"https://${BILLING_HOST}/api/charges"')
    text = text.replace("    owner: revenue-cycle\n", "    owner: revenue-cycle\n    secret: ${BILLING_SECRET}\n")
    path = write(tmp_path, text)
    assert problems_of(path, {"UNRELATED": "x"}) == [
        f"{path}:{line_of(text, 'BILLING_HOST')}: destinations.billing.url: "
        "environment variable BILLING_HOST is not set (used as ${BILLING_HOST})",
        f"{path}:{line_of(text, 'BILLING_SECRET')}: destinations.billing.secret: "
        "environment variable BILLING_SECRET is not set (used as ${BILLING_SECRET})",
    ]


def test_env_vars_are_expanded_everywhere_and_defaults_apply(tmp_path):
    text = BASE.replace('"http://127.0.0.1:9/billing"', '"https://${BILLING_HOST}:${BILLING_PORT:-8443}/charges"')
    text = text.replace('"file:///tmp/courier-test-erp"', '"file://${DROP:-/srv/drop}/erp"')
    text = text.replace('"10.0.0.0/8"', '"${LAB_NET}"')
    text = text.replace("    owner: revenue-cycle\n", "    owner: revenue-cycle\n    secret: ${BILLING_SECRET}\n")
    path = write(tmp_path, text)

    r = load_routing(path, {"BILLING_HOST": "billing.example", "LAB_NET": "192.168.0.0/16",
                            "BILLING_SECRET": "s3cr3t"})
    assert r.destinations["billing"].url == "https://billing.example:8443/charges"
    assert r.destinations["billing"].secret == "s3cr3t"
    assert r.destinations["erp"].url == "file:///srv/drop/erp"
    assert r.sources["lab"].mllp_allow == ("127.0.0.1/32", "192.168.0.0/16")

    # a set variable wins over the default; like the shell's ${VAR:-x}, an empty one does not
    r = load_routing(path, {"BILLING_HOST": "b", "BILLING_PORT": "9443", "DROP": "", "LAB_NET": "10.1.0.0/16",
                            "BILLING_SECRET": "s"})
    assert r.destinations["billing"].url == "https://b:9443/charges"
    assert r.destinations["erp"].url == "file:///srv/drop/erp"


def test_expanded_values_are_validated_too(tmp_path):
    text = BASE.replace('"http://127.0.0.1:9/billing"', '"${BILLING_URL}"')
    path = write(tmp_path, text)
    (problem,) = problems_of(path, {"BILLING_URL": "gopher://old.example/"})
    assert problem.startswith(f"{path}:{line_of(text, 'BILLING_URL')}: destinations.billing.url: ")
    assert "gopher" in problem


# --- durations --------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [
    ("10s", 10.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("30d", 2_592_000.0),
    ("1h30m", 5400.0), ("1h 30m", 5400.0), ("1.5h", 5400.0), ("2m30s", 150.0), ("1s500ms", 1.5),
    (" 10s ", 10.0), ("0s", 0.0), (10, 10.0), (2.5, 2.5), (0, 0.0),
    ("120", 120.0), ("0.25", 0.25),  # a plain number of seconds, as environment variables give it
])
def test_durations_parse(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "10 parsecs", "-5s", "-5", -1, -0.5, True, False, "", "   ", "s", "ms", "5m30", "10sec", "1w",
    "1h-30m", "1e3s", "ten seconds", None, [], {}, float("nan"), float("inf"), "nan", "inf",
])
def test_bad_durations_raise_value_error(value):
    with pytest.raises(ValueError):
        parse_duration(value)


# --- routing ----------------------------------------------------------------

ROUTED = textwrap.dedent("""\
    sources:
      lab: {allowed_types: ["HL7v2:ADT^*", "HL7v2:DFT^P03", "service.*"]}
      other: {}
    destinations:
      billing: {url: "http://127.0.0.1:9/billing", clearance: phi}
      erp: {url: "file:///tmp/courier-test-erp", clearance: phi}
      audit: {url: "file:///tmp/courier-test-audit", clearance: phi}
    routes:
      - match: {source: lab, type: "HL7v2:ADT^*"}
        to: [erp]
      - match: {source: lab}
        to: [audit, erp]
      - match: {type: "service.*"}
        to: [billing, audit]
      - match: {source: other, type: "HL7v2:ADT^A0[1-4]"}
        to: [billing]
    """)


@pytest.mark.parametrize("source, message_type, expected", [
    ("lab", "HL7v2:ADT^A01", ["erp", "audit"]),               # routes 0 and 1; erp once, at its first place
    ("lab", "HL7v2:DFT^P03", ["audit", "erp"]),               # route 1 only (no type: anything)
    ("lab", "service.completed", ["audit", "erp", "billing"]),  # routes 1 and 2 in config order
    ("other", "service.completed", ["billing", "audit"]),      # route 2 (no source: any source)
    ("other", "HL7v2:ADT^A03", ["billing"]),
    ("other", "HL7v2:ADT^A08", []),                            # [1-4] class does not match 8
    ("other", "HL7v2:DFT^P03", []),
    ("lab", "hl7v2:adt^a01", ["audit", "erp"]),                # patterns are case-sensitive
    ("lab-2", "service.completed", ["billing", "audit"]),      # source "lab" is not a prefix pattern
])
def test_destinations_for_unions_matching_routes_in_config_order(tmp_path, source, message_type, expected):
    r = load_routing(write(tmp_path, ROUTED), {})
    assert r.destinations_for(source, message_type) == expected


def test_a_route_without_match_matches_everything(tmp_path):
    text = BASE.replace('  - match: {source: lab, type: "service.completed"}\n    to: [billing, erp]\n',
                        "  - to: [erp]\n")
    r = load_routing(write(tmp_path, text), {})
    assert r.destinations_for("lab", "service.completed") == ["erp"]
    assert r.destinations_for("other", "HL7v2:ORU^R01") == ["erp"]


@pytest.mark.parametrize("message_type, allowed", [
    ("HL7v2:ADT^A01", True), ("HL7v2:ADT^A08", True), ("HL7v2:DFT^P03", True),
    ("service.completed", True), ("service.cancelled", True),
    ("HL7v2:DFT^P11", False), ("HL7v2:ADT", False), ("HL7v2:ORU^R01", False), ("supply.consumed", False),
    ("hl7v2:adt^a01", False), ("", False),
])
def test_allowed_types_are_shell_patterns(tmp_path, message_type, allowed):
    r = load_routing(write(tmp_path, ROUTED), {})
    assert r.sources["lab"].allows(message_type) is allowed
    assert r.sources["other"].allows(message_type) is True  # allowed_types left out: everything


def test_source_allows_nothing_it_does_not_list():
    assert not Source("x", allowed_types=()).allows("service.completed")
    assert Source("x", allowed_types=("HL7v2:ORU^R01",)).allows("HL7v2:ORU^R01")
    assert not Source("x", allowed_types=("HL7v2:ORU^R01",)).allows("HL7v2:ORU^R011")


# --- the shipped example ----------------------------------------------------

def test_shipped_example_config_loads_cleanly():
    example = REPO / "examples" / "courier.yml"
    r = load_routing(example, {})
    assert set(r.sources) == {"lab-engine"}
    assert set(r.destinations) == {"billing", "erp"}
    assert r.destinations["erp"].url == "file:///tmp/courier-drop/erp"
    assert r.destinations_for("lab-engine", "service.completed") == ["billing", "erp"]
    assert r.destinations_for("lab-engine", "HL7v2:ADT^A01") == ["erp"]
    assert r.destinations_for("lab-engine", "HL7v2:DFT^P03") == ["billing"]
    assert r.sources["lab-engine"].allows("HL7v2:ORU^R01")
    assert load_routing(example, {"COURIER_DROP_DIR": "/srv/drop"}).destinations["erp"].url == "file:///srv/drop/erp"


# --- environment ------------------------------------------------------------

@pytest.fixture
def example_env():
    return {"COURIER_CONFIG": str(REPO / "examples" / "courier.yml")}


def test_settings_defaults_follow_the_spec(example_env):
    s = load_settings(env=example_env)
    assert s.database_url == "sqlite:///instance/courier.db"
    assert s.broker_url == "amqp://guest:guest@localhost:5672//"
    assert (s.port, s.mllp_port) == (8000, 2575)
    assert s.sentry_dsn is None and s.encryption_key is None
    assert s.config_path == example_env["COURIER_CONFIG"]
    assert set(s.routing.destinations) == {"billing", "erp"}
    assert s.max_message_bytes == 10 * 1024 * 1024
    assert (s.relay_lease, s.relay_poll, s.relay_batch) == (120.0, 1.0, 200)
    assert s.queue_for("billing") == "courier.deliver.billing"


def test_courier_config_defaults_to_courier_yml_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(env={})
    assert info.value.problems[0].startswith("courier.yml: config file not found")
    (tmp_path / "courier.yml").write_text(BASE)
    assert load_settings(env={}).config_path == "courier.yml"


def test_settings_read_the_environment(example_env):
    s = load_settings(env={**example_env,
                           "DATABASE_URL": "postgresql://postgres@db/courier",
                           "BROKER_URL": "amqp://u:p@mq:5672/courier",
                           "PORT": "9000", "MLLP_PORT": "12575", "SENTRY_DSN": "https://k@sentry.example/1",
                           "COURIER_MAX_MESSAGE_BYTES": "1048576", "COURIER_RELAY_LEASE": "5m",
                           "COURIER_RELAY_POLL": "250ms", "COURIER_RELAY_BATCH": "50",
                           "COURIER_QUEUE_PREFIX": "stage", "COURIER_LOG_LEVEL": "debug"})
    assert s.database_url == "postgresql://postgres@db/courier"
    assert s.broker_url == "amqp://u:p@mq:5672/courier"
    assert (s.port, s.mllp_port, s.max_message_bytes, s.relay_batch) == (9000, 12575, 1048576, 50)
    assert (s.relay_lease, s.relay_poll) == (300.0, 0.25)
    assert s.sentry_dsn == "https://k@sentry.example/1"
    assert s.queue_for("erp") == "stage.deliver.erp"
    assert s.log_level == "DEBUG"
    # plain seconds, as an operator would naturally write in an environment variable
    assert load_settings(env={**example_env, "COURIER_RELAY_LEASE": "90"}).relay_lease == 90.0


def test_keyword_overrides_win(example_env):
    s = load_settings(env={**example_env, "PORT": "9000"}, port=1234, database_url="sqlite://")
    assert (s.port, s.database_url) == (1234, "sqlite://")


@pytest.mark.parametrize("name", ["PORT", "MLLP_PORT", "COURIER_MAX_MESSAGE_BYTES", "COURIER_RELAY_BATCH"])
@pytest.mark.parametrize("value", ["eighty", "80.5", "", "8k"])
def test_bad_integer_env_var_is_a_config_error_naming_it(example_env, name, value):
    with pytest.raises(ConfigError) as info:
        load_settings(env={**example_env, name: value})
    (problem,) = info.value.problems
    assert problem.startswith("environment: ") and f"{name}=" in problem, problem


@pytest.mark.parametrize("name", ["COURIER_RELAY_LEASE", "COURIER_RELAY_POLL"])
def test_bad_duration_env_var_is_a_config_error_naming_it(example_env, name):
    with pytest.raises(ConfigError) as info:
        load_settings(env={**example_env, name: "soon"})
    (problem,) = info.value.problems
    assert problem.startswith(f"environment: {name}: ") and "soon" in problem, problem


def test_bad_routing_file_stops_load_settings(tmp_path):
    path = write(tmp_path, BASE.replace("    timeout: 10s\n", "    timeout: 10 parsecs\n"))
    with pytest.raises(ConfigError) as info:
        load_settings(env={"COURIER_CONFIG": str(path)})
    assert info.value.problems[0].startswith(f"{path}:12: destinations.billing.timeout: ")


def test_nan_and_infinity_are_not_durations():
    with pytest.raises(ValueError, match="finite"):
        parse_duration(float("inf"))
    with pytest.raises(ValueError, match="finite"):
        parse_duration(float("nan"))


def test_source_charset_is_an_msh18_name_and_defaults_to_none(tmp_path):
    r = load_routing(write(tmp_path, BASE.replace("  other: {}\n", "  other: {charset: 8859/1}\n")), {})
    assert (r.sources["lab"].charset, r.sources["other"].charset) == (None, "8859/1")
    text = BASE.replace("  other: {}\n", "  other:\n    charset: EBCDIC\n")
    path = write(tmp_path, text)
    [problem] = problems_of(path)
    assert problem.startswith(f"{path}:{line_of(text, 'charset: EBCDIC')}: sources.other.charset: ")
    assert "8859/1" in problem and "UNICODE UTF-8" in problem
