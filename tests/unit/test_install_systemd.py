"""`courier install systemd`: the units it writes pass `systemd-analyze verify` and run the Procfile's commands.

What `systemd-analyze verify` (systemd 252) really reports, found by hand: a missing ExecStart
program or a missing Required= unit exits 1; an unknown directive, an unknown section or a
value it cannot parse is only a warning on stderr ("file:line: Unknown key ...") with exit 0;
an unknown User=, EnvironmentFile= or Wants=/After= unit (postgresql.service on a machine
without it) is not reported at all. So `verify_problems` fails on a non-zero exit and on any
stderr line naming one of our units, and `test_verify_catches_a_typo` proves that a typo'd
directive is such a line.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from courier.tasks import install

REPO = Path(__file__).resolve().parents[2]
COURIER = REPO / ".venv" / "bin" / "courier"
VENV = Path(sys.prefix)
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_systemd_analyze = pytest.mark.skipif(not os.access(SYSTEMD_ANALYZE, os.X_OK),
                                           reason="systemd-analyze is not installed (the systemd package)")
ENV_VARIABLES = ("DATABASE_URL", "BROKER_URL", "COURIER_CONFIG", "COURIER_ENCRYPTION_KEY", "COURIER_PSEUDONYM_KEY",
                 "FLOWER_BASIC_AUTH", "SENTRY_DSN", "PORT", "MLLP_PORT", "FLOWER_PORT")


def courier_install(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = COURIER if COURIER.exists() else Path(sys.executable).with_name("courier")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURIER_", "FLASK_"))}
    return subprocess.run([str(exe), "install", "systemd", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def generate(prefix: Path, *extra: str, app_dir: Path = REPO) -> subprocess.CompletedProcess:
    result = courier_install("--prefix", str(prefix), "--app-dir", str(app_dir), "--venv", str(VENV), *extra)
    assert result.returncode == 0, result
    return result


def procfile(path: Path = REPO / "Procfile") -> dict[str, list[str]]:
    """The Procfile as the shell reads it, independently of courier.tasks.install: name -> argv (a leading exec dropped)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            words = shlex.split(command)
            out[name.strip()] = words[1:] if words[:1] == ["exec"] else words
    return out


def directives(unit: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (every section; repeated keys kept in order)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def unit_files(prefix: Path) -> list[Path]:
    return sorted(p for p in prefix.iterdir() if p.suffix in (".service", ".target"))


def verify_problems(prefix: Path) -> list[str]:
    """What `systemd-analyze verify` says is wrong with our units (see the module docstring)."""
    units = unit_files(prefix)
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *map(str, units)], capture_output=True, text=True,
                            timeout=120)
    ours = [line for line in result.stderr.splitlines()
            if str(prefix) in line or any(u.name in line for u in units)]
    if result.returncode != 0:
        ours.append(f"exit {result.returncode}: {result.stderr.strip()}")
    return ours


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    generate(tmp_path)
    assert verify_problems(tmp_path) == []


@needs_systemd_analyze
def test_verify_catches_a_typo(tmp_path):
    generate(tmp_path)
    web = tmp_path / "courier-web.service"
    web.write_text(web.read_text().replace("Restart=on-failure", "Restartt=on-failure"))
    problems = verify_problems(tmp_path)
    assert any("Unknown key 'Restartt'" in p for p in problems), problems


def test_every_procfile_process_has_its_unit_and_command(tmp_path):
    generate(tmp_path)
    processes = procfile()
    names = {p.name for p in unit_files(tmp_path)}
    expected = {f"courier-{n}.service" for n in processes if n != "release"} | {"courier-migrate.service",
                                                                                 "courier.target"}
    assert names == expected
    for name, argv in processes.items():
        unit = directives(tmp_path / ("courier-migrate.service" if name == "release" else f"courier-{name}.service"))
        # systemd has ${VAR}, not ${VAR:-default}: the default moves to an Environment= line.
        want = [str(VENV / "bin" / argv[0])] + [re.sub(r"\$\{(\w+):-[^}]*\}", r"${\1}", w) for w in argv[1:]]
        assert [shlex.split(v) for v in unit["ExecStart"]] == [want], name
        for var, default in re.findall(r"\$\{(\w+):-([^}]*)\}", " ".join(argv)):
            assert f"{var}={default}" in unit["Environment"], (name, var)
        assert unit["WorkingDirectory"] == [str(REPO)]
        assert unit["User"] == unit["Group"] == ["courier"]
        assert unit["EnvironmentFile"] == ["/etc/courier/courier.env"]
        assert unit["KillSignal"] == ["SIGTERM"] and unit["StandardOutput"] == ["journal"]
        assert unit["ReadWritePaths"] == [str(REPO / "instance")] and unit["ProtectSystem"] == ["strict"]
        assert unit["PartOf"] == ["courier.target"]
        if name != "release":
            assert unit["Requires"] == ["courier-migrate.service"]
            assert unit["After"][0].split()[0] == "courier-migrate.service"
            assert unit["Restart"] == ["on-failure"] and unit["WantedBy"] == ["courier.target"]
    target = directives(tmp_path / "courier.target")
    assert set(target["Also"][0].split()) == expected - {"courier-migrate.service", "courier.target"}
    # No FLOWER_BASIC_AUTH in the flower unit itself: it comes from the secrets file, or flower refuses to start.
    assert "FLOWER_BASIC_AUTH" not in (tmp_path / "courier-flower.service").read_text()


def test_enabling_the_target_enables_every_process(tmp_path):
    """`systemctl enable courier.target` (offline, --root) wants every process; one can be disabled alone."""
    systemctl = shutil.which("systemctl")
    if not systemctl:
        pytest.skip("systemctl is not installed")
    units = tmp_path / "root" / "etc" / "systemd" / "system"
    generate(units)
    subprocess.run([systemctl, f"--root={tmp_path / 'root'}", "enable", "courier.target"], check=True,
                   capture_output=True, timeout=60)
    wants = {p.name for p in (units / "courier.target.wants").iterdir()}
    assert wants == {f"courier-{n}.service" for n in procfile() if n != "release"}
    assert (units / "multi-user.target.wants" / "courier.target").is_symlink()


def test_env_example_lists_every_variable_and_is_private(tmp_path):
    result = generate(tmp_path)
    example = tmp_path / "courier.env.example"
    assert stat.S_IMODE(example.stat().st_mode) == 0o600
    text = example.read_text()
    for var in ENV_VARIABLES:
        assert re.search(rf"^#?{var}=", text, re.M), var
    assert str(example) in result.stdout
    # Regenerating over a loosened copy makes it private again.
    example.chmod(0o644)
    generate(tmp_path)
    assert stat.S_IMODE(example.stat().st_mode) == 0o600


def test_exec_and_defaults_in_the_procfile_translate(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "Procfile").write_text("release: exec courier db upgrade\n"
                                  "web: exec gunicorn --bind \"0.0.0.0:${PORT:-8000}\" 'courier.app:create_app()' '100%'\n")
    generate(tmp_path / "units", app_dir=app)
    web = directives(tmp_path / "units" / "courier-web.service")
    assert web["ExecStart"] == [f"{VENV}/bin/gunicorn --bind 0.0.0.0:${{PORT}} courier.app:create_app() 100%%"]
    assert "PORT=8000" in web["Environment"]
    assert directives(tmp_path / "units" / "courier-migrate.service")["ExecStart"] == [f"{VENV}/bin/courier db upgrade"]


@pytest.mark.parametrize("command", ["celery worker | tee log", "celery worker && true", "celery $(pwd)",
                                     "celery > log", "PORT=1 gunicorn", "celery ${PORT:?}", "celery a$1b",
                                     "nosuchprogram"])
def test_a_procfile_line_systemd_cannot_run_is_refused(tmp_path, command):
    app = tmp_path / "app"
    app.mkdir()
    (app / "Procfile").write_text(f"release: courier db upgrade\nodd: {command}\n")
    result = courier_install("--prefix", str(tmp_path / "units"), "--app-dir", str(app), "--venv", str(VENV))
    assert_one_line_error(result, "'odd'")
    assert not (tmp_path / "units").exists()


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_prefix_that_is_a_file_is_refused(tmp_path):
    prefix = tmp_path / "units"
    prefix.write_text("not a directory")
    result = courier_install("--prefix", str(prefix), "--app-dir", str(REPO), "--venv", str(VENV))
    assert_one_line_error(result, str(prefix), "not a directory")
    assert prefix.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["units"]


@pytest.mark.parametrize("venv", ["missing", "empty"])
def test_a_missing_venv_is_refused(tmp_path, venv):
    if venv == "empty":
        (tmp_path / "empty").mkdir()
    prefix = tmp_path / "units"
    result = courier_install("--prefix", str(prefix), "--app-dir", str(REPO), "--venv", str(tmp_path / venv))
    assert_one_line_error(result, "--venv", str(tmp_path / venv))
    assert not prefix.exists()


def test_an_app_dir_without_a_procfile_is_refused(tmp_path):
    prefix = tmp_path / "units"
    prefix.mkdir()
    result = courier_install("--prefix", str(prefix), "--app-dir", str(tmp_path), "--venv", str(VENV))
    assert_one_line_error(result, "Procfile")
    assert list(prefix.iterdir()) == []


def test_unit_paths_that_would_need_escaping_are_refused(tmp_path):
    result = courier_install("--prefix", str(tmp_path / "u"), "--app-dir", str(REPO), "--venv", str(VENV),
                             "--env-file", "/etc/courier/my secrets.env")
    assert_one_line_error(result, "--env-file")
    assert not (tmp_path / "u").exists()


def test_translate_keeps_literal_dollars_and_percents_literal():
    assert install.translate("x", "courier a\\$b '$c' \"${D:-1} %\"").words == ["courier", "a$$b", "$$c", "${D} %%"]
    assert install.translate("x", "courier $HOME").words == ["courier", "${HOME}"]
