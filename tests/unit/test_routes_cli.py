"""`courier routes test` and the hospital scenario (examples/hospital.yml, issue 7).

Most runs are in-process (click's runner, the environment set per call). The proof that a dry
run touches neither the store nor the broker nor a destination runs the real console script on
PostgreSQL, and the hospital's sinks run as a process: tests/integration/test_routes_cli.py.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from courier.app.domain import governance
from courier.app.config import load_routing
from courier.app.domain.transforms import LEDGER_COLUMNS
from courier.tasks.cli import cli
from tests.support.data import HL7_SAMPLES

REPO = Path(__file__).resolve().parents[2]
HOSPITAL = REPO / "examples" / "hospital.yml"
EVENTS = REPO / "examples" / "events"
KEY = "test-pseudonym-key-0123456789abcdef"
DFT_P03 = [HL7_SAMPLES / "microsoft-FHIR-Converter" / f"DFT-P03-0{n}.hl7" for n in (1, 2)]
ADT_A01 = [HL7_SAMPLES / "microsoft-FHIR-Converter" / "ADT-A01-01.hl7", HL7_SAMPLES / "python-hl7" /
           "samples.py__sample_msh.hl7"]
# Nowhere: a dry run that tried the store or the broker would fail, or hang, here.
UNREACHABLE = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere",
               "BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}


def routes_test(*args: str, config: Path = HOSPITAL, **env: str):
    """`courier routes test ARGS` in-process; returns click's Result (exit_code, stdout, stderr)."""
    environment = {"COURIER_CONFIG": str(config), "COURIER_PSEUDONYM_KEY": KEY, **UNREACHABLE, **env}
    return CliRunner().invoke(cli, ["routes", "test", *map(str, args)], env=environment, catch_exceptions=False)


def dry_run(*args: str, **kw) -> dict:
    """The --json report of a run that must succeed: {destination name: its entry} per message."""
    result = routes_test("--json", *args, **kw)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def by_name(message: dict) -> dict[str, dict]:
    return {d["name"]: d for d in message["destinations"]}


def csv_rows(payload: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(payload))
    assert tuple(reader.fieldnames) == LEDGER_COLUMNS
    return list(reader)


def names_in(patient: dict) -> set[str]:
    """Every part of a patient's names: none may reach a destination below phi."""
    return {v for n in patient.get("names", []) for k, v in n.items() if k != "type" and len(v) > 2}


def hl7_field(text: str, segment: str, number: int) -> list[str]:
    return [line.split("|")[number] for line in re.split(r"\r\n|\r|\n", text) if line.startswith(segment + "|")]


# --- the hospital scenario ----------------------------------------------------------------

def test_hospital_config_passes_the_check_with_a_pseudonym_key_only():
    routing = load_routing(HOSPITAL, {"COURIER_PSEUDONYM_KEY": KEY})
    assert set(routing.destinations) == {"billing", "erp", "inventory", "legacy-adt"}
    assert {n: d.clearance for n, d in routing.destinations.items()} == {
        "billing": "phi", "erp": "deidentified", "inventory": "limited", "legacy-adt": "phi"}
    check = CliRunner().invoke(cli, ["config", "check", "--file", str(HOSPITAL)], env={"COURIER_PSEUDONYM_KEY": KEY})
    assert check.exit_code == 0, check.stderr
    assert check.stdout.strip() == f"{HOSPITAL}: ok (2 sources, 4 destinations, 4 routes)"
    refused = CliRunner().invoke(cli, ["config", "check", "--file", str(HOSPITAL)], env={"COURIER_PSEUDONYM_KEY": ""})
    assert refused.exit_code == 1
    assert [line.split(": ")[1] for line in refused.stderr.splitlines()] == [
        "destinations.erp.clearance", "destinations.inventory.clearance"]
    assert "COURIER_PSEUDONYM_KEY is not set" in refused.stderr


@pytest.mark.parametrize("path", sorted(EVENTS.glob("service.completed-*.json")), ids=lambda p: p.name)
def test_service_completed_goes_to_billing_in_full_and_to_erp_without_the_patient(path):
    event = json.loads(path.read_text())
    (message,) = dry_run("--source", "clinical", path)["messages"]
    assert message["type"] == "service.completed"
    billing, erp = by_name(message)["billing"], by_name(message)["erp"]
    assert list(by_name(message)) == ["billing", "erp"]  # not inventory (no supplies), not the ADT engine

    assert (billing["scheme"], billing["clearance"], billing["transform"]) == ("http", "phi", "canonical_json")
    assert billing["content_type"] == "application/json" and billing["error"] is None
    (sent,) = json.loads(billing["payload"])["events"]
    assert (sent["type"], sent["version"], sent["id"]) == ("service.completed", 1, event["id"])
    assert sent["data"] == event["data"]  # cleared for PHI: the whole service, patient included

    assert (erp["scheme"], erp["clearance"], erp["transform"]) == ("file", "deidentified", "erp_csv")
    (row,) = csv_rows(erp["payload"])
    centre = event["data"]["service"]["cost_centre"]
    assert (row["event_type"], row["event_id"]) == ("service.completed", event["id"])
    assert (row["cost_centre"], row["gl_account"]) == (centre["code"], centre["gl_account"])
    assert row["code"] == event["data"]["service"]["code"]["code"]
    patient = event["data"]["patient"]
    assert row["patient_ref"] == governance.pseudonym(patient["id"], "patient", KEY.encode())  # the ERP can join
    for secret in names_in(patient) | {i["value"] for i in patient["identifiers"]} | {patient["birth_date"]}:
        assert secret not in erp["payload"], secret


@pytest.mark.parametrize("path", sorted(EVENTS.glob("supply.consumed-*.json")), ids=lambda p: p.name)
def test_supply_consumed_is_one_inventory_row_and_an_erp_line(path):
    event = json.loads(path.read_text())
    (message,) = dry_run("--source", "clinical", path)["messages"]
    assert list(by_name(message)) == ["inventory", "erp"]
    inventory, erp = by_name(message)["inventory"], by_name(message)["erp"]
    assert (inventory["scheme"], inventory["clearance"], inventory["transform"]) == ("sql+sqlite", "limited", "sql_row")
    row, data = json.loads(inventory["payload"]), event["data"]
    assert (row["code"], row["code_display"], row["quantity"], row["unit"]) == (
        data["item"]["sku"], data["item"]["description"], data["quantity"], data["unit"])
    assert (row["department"], row["cost_centre"], row["service_date"]) == (
        data["department"]["code"], data["cost_centre"]["code"], data["consumed_at"])  # limited: ward and day
    assert row["reference"] == data.get("lot_number")
    (line,) = csv_rows(erp["payload"])
    assert (line["code"], line["quantity"], line["gl_account"]) == (data["item"]["sku"], data["quantity"],
                                                                    data["cost_centre"]["gl_account"])
    patient = data.get("patient", {})
    for secret in names_in(patient) | {data.get("serial_number")} - {None}:
        assert secret not in inventory["payload"] and secret not in erp["payload"], secret


@pytest.mark.parametrize("path", DFT_P03, ids=lambda p: p.name)
def test_dft_p03_charges_go_to_billing_and_erp(path):
    text = path.read_text()
    ft1_amounts = [f.split("&")[0] for f in hl7_field(text, "FT1", 11)]
    (message,) = dry_run("--source", "interface-engine", path)["messages"]
    assert message["type"] == "HL7v2:DFT^P03"
    assert list(by_name(message)) == ["billing", "erp"]
    events = json.loads(by_name(message)["billing"]["payload"])["events"]
    assert [e["type"] for e in events] == ["charge.posted"] * len(ft1_amounts)  # one per FT1
    assert [e["data"]["charge"]["amount"]["amount"] for e in events] == ft1_amounts
    assert events[0]["data"]["patient"]["id"] == "PATID1234"  # billing bills the patient

    erp = by_name(message)["erp"]["payload"]
    rows = csv_rows(erp)
    assert [(r["event_type"], r["amount"], r["currency"]) for r in rows] == [
        ("charge.posted", a, "USD") for a in ft1_amounts]
    # PID-5 (EVERYMAN^ADAM, Josh) and PID-3 (PATID1234, an SSN) stay out of the ERP.
    for secret in ("EVERYMAN", "ADAM", "Josh", "PATID1234", "123456789"):
        assert secret not in erp, secret
    assert {r["patient_ref"] for r in rows} == {governance.pseudonym("PATID1234", "patient", KEY.encode())}


@pytest.mark.parametrize("path", ADT_A01, ids=lambda p: p.name)
def test_adt_goes_only_to_the_legacy_engine_as_sent_in_patient_order(path):
    (message,) = dry_run("--source", "interface-engine", path)["messages"]
    assert message["type"] == "HL7v2:ADT^A01"
    (engine,) = message["destinations"]
    assert (engine["name"], engine["scheme"], engine["clearance"], engine["transform"]) == (
        "legacy-adt", "mllp", "phi", "passthrough")
    assert engine["ordered_by"] == "PID-3.1"
    assert engine["order_key"] == hl7_field(path.read_text(), "PID", 3)[0].split("~")[0].split("^")[0]
    # As received: Courier stores HL7 byte for byte (the MLLP adapter ends segments in CR on the wire).
    text = path.read_bytes().decode("utf-8-sig")  # read_text() would turn CR into LF
    assert engine["payload"] in text and engine["payload"].startswith("MSH|")
    assert engine["payload"].rstrip("\r\n") == text[text.index("MSH"):].rstrip(" \t\r\n")


def test_text_output_names_each_destination_and_shows_hl7_segments_one_per_line(tmp_path):
    result = routes_test("--source", "interface-engine", ADT_A01[0])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"{ADT_A01[0]}: 1 message from source interface-engine as application/hl7-v2; dry run")
    assert "HL7v2:ADT^A01 -> legacy-adt\n" in out
    assert "=== legacy-adt (mllp, clearance phi, transform passthrough, ordered by PID-3.1 (key 'PATID1234'))" in out
    assert "\r" not in out and "\nPID|1|" in out  # the file's segments end in LF, stored as received
    no_pid = tmp_path / "a08.hl7"
    no_pid.write_text("MSH|^~\\&|ADT|HOSP|ENGINE|HOSP|20240101||ADT^A08|X1|P|2.5\rEVN|A08\r")
    result = routes_test("--source", "interface-engine", no_pid)
    assert "ordered by PID-3.1 (no key: unordered))" in result.stdout, result.stderr
    assert "(segments end in CR; one per line here)" in result.stdout and "\r" not in result.stdout
    assert "\nEVN|A08\n" in result.stdout


# --- what a dry run does not do ------------------------------------------------------------

def test_a_host_apps_cli_dry_runs_with_the_hosts_settings(tmp_path):
    """`flask --app app courier routes test`: the host's routing file (COURIER_CONFIG is unset), and
    the host's database is not even created."""
    host = REPO / "examples" / "embedded_host"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "FLASK_", "DATABASE_URL"))}
    env.update(SUPPLYROOM_DATABASE_URL=f"sqlite:///{tmp_path}/host.db", PYTHONPATH=f"{host}{os.pathsep}{REPO}")
    result = subprocess.run([str(Path(sys.executable).with_name("flask")), "--app", "app", "courier", "routes",
                             "test", str(EVENTS / "supply.consumed-gauze.json")], cwd=host, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "1 message from source supply-room as application/json" in result.stdout
    assert "=== erp (http, clearance phi, transform passthrough)" in result.stdout
    assert not (tmp_path / "host.db").exists()


# --- choosing the source and the content type; refusals ------------------------------------

def test_source_is_required_when_several_are_configured_and_must_exist():
    result = routes_test(EVENTS / "service.completed-ecg.json")
    assert result.exit_code == 2
    assert "has 2 sources: name one with --source (clinical, interface-engine)" in result.stderr
    result = routes_test("--source", "pharmacy", EVENTS / "service.completed-ecg.json")
    assert result.exit_code == 2
    assert "'pharmacy' is not a source in" in result.stderr and result.stdout == ""


def test_messages_the_source_may_not_send_or_that_are_malformed_exit_1(tmp_path):
    result = routes_test("--source", "interface-engine", EVENTS / "supply.consumed-gauze.json")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("refused (422 type_not_allowed): source 'interface-engine' may not send "
                                    "'supply.consumed'\n")
    broken = tmp_path / "broken.hl7"
    broken.write_text("MSH|^~\\&|LAB|HOSP\rPID|1\r")
    result = routes_test("--source", "interface-engine", broken)
    assert result.exit_code == 1 and "refused (400 malformed): not a valid HL7 v2 message" in result.stderr
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"type": "service.completed", "data": ')
    result = routes_test("--source", "clinical", "--json", bad_json)
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"]["code"] == "malformed"


def test_content_type_is_guessed_or_must_be_given(tmp_path):
    adt = tmp_path / "adt.txt"
    adt.write_bytes(b"\xef\xbb\xbf\n" + ADT_A01[1].read_bytes())  # a BOM and a blank line before MSH
    report = dry_run("--source", "interface-engine", adt)
    assert report["content_type"] == "application/hl7-v2"
    assert report["messages"][0]["type"] == "HL7v2:ADT^A01"
    unknown = tmp_path / "note.txt"
    unknown.write_text("PID|1||42\r")
    result = routes_test("--source", "interface-engine", unknown)
    assert result.exit_code == 2 and "give --content-type" in result.stderr
    result = routes_test("--source", "interface-engine", "--content-type", "text/plain", unknown)
    assert result.exit_code == 1 and "refused (415 unsupported_media_type)" in result.stderr


# --- transform refusals, secrets in URLs, binary payloads, batches -------------------------

def binary_format(envelope):
    """A raw transform (no decorator: phi only) whose output is not text."""
    return b"\x00\x1b[2J" + envelope.body[:4] + b"\xff", "application/octet-stream"


@pytest.fixture
def lab_config(tmp_path):
    """One source; a SQL destination with a password in its URL; a binary transform."""
    doc = {"sources": {"lab": {"allowed_types": ["HL7v2:*", "service.completed"]}},
           "destinations": {
               "ledger": {"url": "sql+postgresql://courier:s3cret-pw@erp-db.internal/erp?table=charges",
                          "clearance": "phi", "transform": "sql_row"},
               "archive": {"url": "file:///var/spool/archive", "clearance": "phi",
                           "transform": "tests.unit.test_routes_cli:binary_format"}},
           "routes": [{"match": {"type": "HL7v2:DFT^P03"}, "to": ["ledger", "archive"]},
                      {"match": {"type": "HL7v2:ADT^*"}, "to": ["archive"]}]}
    path = tmp_path / "lab.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_transform_that_refuses_is_shown_with_the_workers_reason_and_exit_3(lab_config):
    result = routes_test(DFT_P03[0], config=lab_config)  # the only source: no --source needed
    assert result.exit_code == 3, result.stderr
    assert "=== ledger (sql+postgresql, clearance phi, transform sql_row)\nREFUSED, the delivery would be dead " \
           "at once: transform sql_row failed: TransformError: sql_row makes one row per delivery, and this " \
           "message holds 2 events" in result.stdout
    assert "=== archive (file," in result.stdout  # the other destination is still shown
    report = json.loads(routes_test("--json", DFT_P03[0], config=lab_config).stdout)
    ledger = by_name(report["messages"][0])["ledger"]
    assert ledger["error"].startswith("transform sql_row failed: TransformError:") and ledger["payload"] is None
    for output in (result.stdout, json.dumps(report)):
        assert "s3cret" not in output and "erp-db" not in output and "/var/spool" not in output


def test_binary_payloads_are_shown_as_base64_never_raw(lab_config):
    result = routes_test(ADT_A01[1], config=lab_config)
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x00" not in result.stdout
    expected = base64.b64encode(b"\x00\x1b[2JMSH|\xff").decode()
    assert f"application/octet-stream, 10 bytes, not printable text; base64:\n{expected}\n" in result.stdout
    archive = by_name(dry_run(ADT_A01[1], config=lab_config)["messages"][0])["archive"]
    assert (archive["payload"], archive["payload_base64"], archive["bytes"]) == (None, expected, 10)


def test_a_batch_is_shown_message_by_message(tmp_path):
    one = (REPO / "examples" / "adt_a01.hl7").read_text().replace("\n", "\r")
    batch = tmp_path / "batch.hl7"
    batch.write_text(one + one.replace("TOUR0001", "TOUR0002").replace("123456^", "654321^"))
    result = routes_test("--source", "interface-engine", batch)
    assert result.exit_code == 0, result.stderr
    assert "2 messages (a batch)" in result.stdout
    assert "message 1 of 2: HL7v2:ADT^A01 -> legacy-adt" in result.stdout
    assert "message 2 of 2: HL7v2:ADT^A01 -> legacy-adt" in result.stdout
    report = dry_run("--source", "interface-engine", batch)
    assert [m["destinations"][0]["order_key"] for m in report["messages"]] == ["123456", "654321"]


def test_an_unrouted_message_says_so(tmp_path, lab_config):
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"type": "service.completed", "data": {}}))
    result = routes_test(event, config=lab_config)
    assert result.exit_code == 0, result.stderr
    assert "service.completed: no route matches; it would be stored as unrouted, with no deliveries" in result.stdout
