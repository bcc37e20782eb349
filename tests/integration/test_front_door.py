"""The product started the way a newcomer starts it: a fresh clone, `make run`, the README's tour.

The clone is of this repository's HEAD (what is committed is what is tested), into a temporary
folder, with an environment stripped of everything `make test` and this machine's shell set:
`make run` there makes its own .venv and SQLite store. The README's "A five-minute tour" blocks
run as written; the test then checks what they promise (delivered, Flower behind basic auth,
every process up, a clean exit on SIGTERM). `make hospital` gets the same with the scenario of
docs/hospital.md. Both use the README's ports (8000, 2575, 5555, 9000; 9001 and 6661 for the
hospital's sinks), which must be free; the queues get a name of their own on the shared RabbitMQ.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOUR_PORTS = {"web": 8000, "mllp": 2575, "flower": 5555, "sink": 9000}
HOSPITAL_PORTS = {"web": 8000, "mllp": 2575, "billing": 9001, "legacy-adt": 6661}
# What a newcomer's shell does not have: make test's exports, a venv, Courier's own settings.
INHERITED = ("COURIER_", "FLOWER_", "MAKE", "MFLAGS", "PYTEST_", "VIRTUAL_ENV")
SETTINGS = ("DATABASE_URL", "BROKER_URL", "PORT", "MLLP_PORT", "SENTRY_DSN", "PYTHONPATH")
PROCESSES = ("web", "worker", "relay", "beat", "mllp", "flower")

pytestmark = pytest.mark.slow  # clones, installs and runs the whole stack (about 2 minutes)


def tour_blocks(readme: str) -> tuple[list[str], list[str]]:
    """The tour's shell blocks: (the ones to leave running, the rest in order)."""
    section = readme.split("\n## A five-minute tour\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    running = [b for b in blocks if "# leave it running" in b]
    return running, [b for b in blocks if b not in running]


def newcomer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED) and k not in SETTINGS}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    return {**env, "COURIER_QUEUE_PREFIX": f"front-door-{secrets.token_hex(3)}", **extra}


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("newcomer") / "courier"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True, timeout=120)
    return folder


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_until(condition, what: str, logs, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f}s\n{logs()}")


def http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Terminal:
    """A command left running in a terminal of its own: its own session, output kept in a file."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the whole process group, as systemd or a closing terminal does; wait for it to empty."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(self.proc.pid, signal.SIGKILL)
        pytest.fail(f"processes of {self.log.name} still running {timeout:.0f}s after SIGTERM\n{self.output()[-3000:]}")


@contextmanager
def terminals(cwd: Path, env: dict[str, str], logs: Path, commands: dict[str, str]):
    """Start each named command in a Terminal; on the way out stop them all (the first one last)."""
    started = {}
    try:
        for name, command in commands.items():
            started[name] = Terminal(command, cwd, env, logs / f"{name}.log")
        yield started
    finally:
        for terminal in reversed(started.values()):
            terminal.stop()


def exits(output: str) -> dict[str, int]:
    """honcho's 'NAME.1 stopped (rc=N)' lines: process -> exit code."""
    return {m[0]: int(m[1]) for m in re.findall(r"system\s+\| (\w+)\.1 stopped \(rc=(-?\d+)\)", output)}


def stats(clone: Path, env: dict[str, str]) -> dict:
    result = subprocess.run([str(clone / ".venv/bin/courier"), "stats", "--json"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["destinations"]


def all_delivered(expected: dict[str, int]):
    """A condition on `courier stats`: each destination has delivered exactly its expected count, none dead."""
    def check(destinations):
        return all(destinations[name]["delivered"] == n and destinations[name]["dead"] == 0
                   for name, n in expected.items())
    return check


def assert_clean_stop(stack: Terminal) -> None:
    stack.stop()
    output = stack.output()
    stopped = exits(output)
    assert set(stopped) >= set(stack.expected), output[-4000:]
    assert all(stopped[name] == 0 for name in stack.expected), stopped


def test_make_run_and_the_readme_tour_on_a_fresh_clone(clone, tmp_path):
    busy = [f"{name} ({port})" for name, port in TOUR_PORTS.items() if not port_free(port)]
    assert not busy, f"the tour's ports are taken: {', '.join(busy)}"
    running, steps = tour_blocks((clone / "README.md").read_text())
    assert [b.split("#")[0].strip() for b in running] == ["make run", "python3 examples/sink.py 9000"]
    env = newcomer_env()
    with terminals(clone, env, tmp_path, {"stack": running[0], "sink": running[1]}) as t:
        stack, sink = t["stack"], t["sink"]
        stack.expected = PROCESSES
        logs = lambda: f"--- make run\n{stack.output()[-6000:]}\n--- sink\n{sink.output()[-2000:]}"  # noqa: E731
        started = time.monotonic()
        wait_until(lambda: http_status("http://127.0.0.1:8000/healthz") == 200, "/healthz answers", logs, 600)
        print(f"fresh clone to /healthz: {time.monotonic() - started:.1f}s")
        for port in (TOUR_PORTS["mllp"], TOUR_PORTS["flower"], TOUR_PORTS["sink"]):
            wait_until(lambda: not port_free(port), f"port {port} listens", logs)

        tour = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(steps)], cwd=clone, env=env,
                              capture_output=True, text=True, timeout=180)
        assert tour.returncode == 0, f"{tour.stdout}\n{tour.stderr}\n{logs()}"
        answers = [json.loads(line) for line in tour.stdout.splitlines() if line.startswith('{"')]
        assert [a.get("status") for a in answers[:3]] == ["accepted", "accepted", "accepted"], tour.stdout
        assert answers[0]["id"] == answers[1]["id"], "the repeated event is not answered as its duplicate"
        assert "MSA|AA|MSG00001" in tour.stdout, tour.stdout  # the MLLP ACK mllp_send printed

        # Both JSON and HL7 (HTTP and MLLP) delivered: billing = the event + the DFT^P03, erp = the event + the ADT.
        cli_env = {**env, "COURIER_CONFIG": "examples/courier.yml"}  # as the tour's export
        wait_until(lambda: all_delivered({"billing": 2, "erp": 2})(stats(clone, cli_env)), "all four delivered", logs)
        assert sink.output().count("key=") == 2, sink.output()
        erp_ids = {d["id"] for a in answers[:3] for d in a["deliveries"] if d["destination"] == "erp"}
        assert {p.stem for p in Path("/tmp/courier-drop/erp").iterdir()} >= erp_ids

        line = re.search(r"Flower: (http://\S+) user (\S+) password (\S+) ", stack.output())
        assert line, stack.output()[-4000:]
        assert http_status(line[1] + "api/workers") == 401
        assert http_status(line[1] + "api/workers", f"{line[2]}:{line[3]}") == 200
        assert (clone / "instance/flower-auth").stat().st_mode & 0o777 == 0o600
        # The tour's console link: served by make run's web process, asking for a token first.
        with urllib.request.urlopen("http://127.0.0.1:8000/console/", timeout=30) as page:
            assert urllib.parse.urlsplit(page.geturl()).path == "/console/login" and b'name="token"' in page.read()
        assert not exits(stack.output()), f"a process stopped while the stack ran\n{logs()}"
        assert "Traceback" not in stack.output(), logs()
        t.pop("stack")
        assert_clean_stop(stack)

        # And it keeps working: the second `make run` comes up on what the first left, with the same credential.
        again = t["again"] = Terminal(running[0], clone, env, tmp_path / "again.log")
        again.expected = PROCESSES
        wait_until(lambda: http_status("http://127.0.0.1:8000/healthz") == 200, "/healthz after a restart",
                   again.output, 300)
        wait_until(lambda: not port_free(TOUR_PORTS["flower"]), "Flower after a restart", again.output)
        assert http_status(line[1] + "api/workers", f"{line[2]}:{line[3]}") == 200
        assert f"password {line[3]} " in again.output()
        t.pop("again")
        assert_clean_stop(again)


def test_make_hospital_on_a_fresh_clone(clone, tmp_path):
    busy = [f"{name} ({port})" for name, port in HOSPITAL_PORTS.items() if not port_free(port)]
    assert not busy, f"the hospital scenario's ports are taken: {', '.join(busy)}"
    venv = clone / ".venv/bin"
    subprocess.run(["make", "install"], cwd=clone, env=newcomer_env(), check=True, capture_output=True, timeout=600)
    hospital_dir = tmp_path / "hospital"
    env = newcomer_env(PATH=f"{venv}{os.pathsep}{newcomer_env()['PATH']}", COURIER_HOSPITAL_DIR=str(hospital_dir),
                       COURIER_PSEUDONYM_KEY=base64.b64encode(os.urandom(32)).decode())
    cli_env = {**env, "COURIER_CONFIG": "examples/hospital.yml", "DATABASE_URL": "sqlite:///instance/hospital.db"}
    with terminals(clone, env, tmp_path, {"stack": "make hospital", "sinks": "python3 examples/hospital_sinks.py"}) as t:
        stack, sinks = t["stack"], t["sinks"]
        stack.expected = ("web", "worker", "relay", "mllp")
        logs = lambda: f"--- make hospital\n{stack.output()[-6000:]}\n--- sinks\n{sinks.output()[-3000:]}"  # noqa: E731
        wait_until(lambda: "ready:" in sinks.output(), "the sinks are ready", logs)
        wait_until(lambda: http_status("http://127.0.0.1:8000/healthz") == 200, "/healthz answers", logs, 300)
        wait_until(lambda: not port_free(HOSPITAL_PORTS["mllp"]), "the MLLP listener listens", logs)

        def token(source: str) -> str:
            result = subprocess.run([str(venv / "courier"), "tokens", "create", "--source", source], cwd=clone,
                                    env=cli_env, capture_output=True, text=True, timeout=60, check=True)
            return result.stdout.strip()

        def post(token: str, content_type: str, path: str) -> dict:
            request = urllib.request.Request("http://127.0.0.1:8000/api/v1/messages", data=(clone / path).read_bytes(),
                                             headers={"Authorization": f"Bearer {token}", "Content-Type": content_type})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 202
                return json.loads(response.read())

        clinical, engine = token("clinical"), token("interface-engine")
        for event in ("service.completed-ecg", "supply.consumed-implant"):
            post(clinical, "application/json", f"examples/events/{event}.json")
        post(engine, "application/hl7-v2", "examples/hl7/DFT-P03-01.hl7")
        adt = (clone / "examples/adt_a01.hl7").read_bytes().replace(b"\n", b"\r")
        with socket.create_connection(("127.0.0.1", HOSPITAL_PORTS["mllp"]), timeout=30) as s:
            s.sendall(b"\x0b" + adt + b"\x1c\r")
            ack = s.recv(4096)
        assert b"MSA|AA|TOUR0001" in ack, ack

        expected = {"billing": 2, "erp": 3, "inventory": 1, "legacy-adt": 1}
        wait_until(lambda: all_delivered(expected)(stats(clone, cli_env)), f"delivered {expected}", logs)
        wait_until(lambda: "legacy-adt: HL7v2:ADT^A01 MSH-10=TOUR0001 PID-3.1=123456" in sinks.output(),
                   "the legacy engine got the ADT", logs, 10)
        assert sinks.output().count("/charges key=") == 2, sinks.output()
        erp = [p.read_text() for p in (hospital_dir / "erp").iterdir() if not p.name.startswith(".")]
        assert len(erp) == 3
        # Deidentified: no patient's name or MRN from any of the three messages reaches the ERP.
        for phi in ("Nakamura", "Delacroix", "EVERYMAN", "PATID1234", "PJN8812204H"):
            assert not any(phi in f for f in erp), phi
        assert all("psn:" in f for f in erp)  # patients as keyed pseudonyms
        with sqlite3.connect(hospital_dir / "inventory.db") as db:
            rows = db.execute("SELECT sku, quantity, ward, lot FROM supply_usage").fetchall()
        assert rows == [("MDT-PM-ADAPTA-01", 1, "OR-2", "LOT-H4471")]
        t.pop("stack")
        assert_clean_stop(stack)


def test_make_cluster_on_a_fresh_clone(clone, tmp_path):
    """`make cluster` (docs/scaling.md) from a fresh clone: three RabbitMQ nodes, a PostgreSQL primary and
    standby and two Courier nodes come up; an event posted to node b and an HL7 message sent to node a's
    listener are both delivered; SIGTERM stops and removes everything, the environment file included."""
    from tests.support.config import write_config
    from tests.support.sinks import HttpSink

    with HttpSink() as sink:
        config = write_config(tmp_path / "courier.yml", {"sink": sink.url})
        config.write_text(config.read_text().replace("  lab:\n", "  lab:\n    mllp_allow: [127.0.0.1/32]\n", 1))
        env = newcomer_env(COURIER_CONFIG=str(config))
        cluster = Terminal("make cluster", clone, env, tmp_path / "cluster.log")
        try:
            wait_until(lambda: "Ctrl-C stops everything" in cluster.output(), "make cluster is up",
                       lambda: cluster.output()[-4000:], timeout=420)
            output = cluster.output()
            webs = dict(re.findall(r"Courier node (\w): web (http://[\d.:]+),", output))
            listeners = {n: int(p) for n, p in re.findall(r"Courier node (\w): web \S+ MLLP 127\.0\.0\.1:(\d+)",
                                                          output)}
            assert set(webs) == set(listeners) == {"a", "b"}, output
            shared = dict(re.findall(r"^(\w+)='(.*)'$", (clone / "instance/cluster.env").read_text(), re.M))
            assert shared["DATABASE_URL"].count(",") == 1 and "target_session_attrs=read-write" in \
                shared["DATABASE_URL"], shared  # the primary and the standby
            assert shared["BROKER_URL"].count(";") == 2, shared  # three RabbitMQ nodes
            token = subprocess.run([str(clone / ".venv/bin/courier"), "tokens", "create", "--source", "lab"],
                                   cwd=clone, env={**env, **shared}, capture_output=True, text=True, timeout=60,
                                   check=True).stdout.strip().splitlines()[-1]

            request = urllib.request.Request(f"{webs['b']}/api/v1/messages", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                data=json.dumps({"type": "service.completed", "id": "cluster-1", "data": {"n": 1}}).encode())
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 202
            adt = "MSH|^~\\&|LAB|HOSP|COURIER|HOSP|20240101120000||ADT^A01|CLUSTER0001|P|2.5\rPID|1||42^^^HOSP^MR\r"
            with socket.create_connection(("127.0.0.1", listeners["a"]), timeout=30) as s:
                s.sendall(b"\x0b" + adt.encode() + b"\x1c\r")
                ack = s.recv(4096)
            assert b"MSA|AA|CLUSTER0001" in ack, ack
            wait_until(lambda: len(sink.received) >= 2, "both delivered", lambda: cluster.output()[-4000:], 120)
            bodies = b"".join(r.body for r in sink.received)
            assert b"cluster-1" in bodies and b"CLUSTER0001" in bodies, bodies
        finally:
            cluster.stop(timeout=120)
    output = cluster.output()
    assert "stopped" in output, output[-3000:]
    scratch = re.search(r"logs in (/\S+)/logs;", output).group(1)
    assert not Path(scratch).exists(), f"{scratch} left behind"
    assert not (clone / "instance/cluster.env").exists()
