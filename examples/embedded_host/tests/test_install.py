"""The supply room's own `app`, `tasks` and `migrations` beside an installed Courier (`courier.*`), and
Courier's console script working with this folder first on the path."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pkgutil
import sys
import sysconfig
from importlib.metadata import distribution
from pathlib import Path

import app
import app.models
import migrations

import courier
import courier.app
from conftest import BIN, HOST_DIR, host_env, run

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"]).resolve()
# Run, not imported: Alembic executes env.py inside a migration context; courier.tasks.worker is
# Courier's own standalone worker app, built from COURIER_CONFIG when imported.
NOT_IMPORTABLE = {"courier.migrations.env", "courier.tasks.worker"}
OPTIONAL = {"hl7"}  # what an extra this host did not install brings (courier[mllp])


HOST_PACKAGES = ("app", "tasks", "migrations")


def _origin(value) -> str:
    """The module a value comes from: a module's own name, else its `__module__` (empty if it has none)."""
    name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
    return name if isinstance(name, str) else ""


def test_the_host_packages_are_this_folders():
    assert Path(app.__file__).resolve() == HOST_DIR / "app" / "__init__.py"
    assert Path(migrations.__file__).resolve() == HOST_DIR / "migrations" / "__init__.py"
    assert Path(app.models.__file__).resolve() == HOST_DIR / "app" / "models.py"
    assert app.create_app.__module__ == "app" and isinstance(app.courier, courier.Courier)


def test_importing_the_worker_module_gives_the_hosts_celery_app(migrated, monkeypatch):
    monkeypatch.setenv("SUPPLYROOM_DATABASE_URL", migrated)
    monkeypatch.delitem(sys.modules, "tasks", raising=False)
    import tasks

    assert Path(tasks.__file__).resolve() == HOST_DIR / "tasks" / "__init__.py"
    assert "courier.deliver" in tasks.celery.tasks  # Courier's delivery task, registered from courier.tasks
    assert tasks.celery.tasks["courier.deliver"].__module__ == "courier.tasks.deliver"


def test_courier_is_the_installed_wheel_not_a_source_tree():
    assert sys.prefix != sys.base_prefix, "not running in a virtualenv"
    for module in (courier, courier.app):
        path = Path(module.__file__).resolve()
        assert path.is_relative_to(SITE_PACKAGES), f"{module.__name__} from {path}, not {SITE_PACKAGES}"
        assert not path.is_relative_to(HOST_DIR)
    assert Path(courier.app.__file__).resolve() == SITE_PACKAGES / "courier" / "app" / "__init__.py"
    direct_url = distribution("courier").read_text("direct_url.json")  # written by pip for a file install
    if direct_url is not None:
        info = json.loads(direct_url)
        assert not info.get("dir_info", {}).get("editable"), f"an editable install: {info}"
        assert info["url"].endswith(".whl"), info


def test_every_courier_module_imports_beside_the_host_packages(migrated, monkeypatch):
    """With the host's app/tasks/migrations loaded, all of Courier imports and none of it lands on the host's."""
    monkeypatch.setenv("SUPPLYROOM_DATABASE_URL", migrated)
    import tasks  # noqa: F401  (the host's, as its worker would have it)

    names = [m.name for m in pkgutil.walk_packages(courier.__path__, "courier.") if m.name not in NOT_IMPORTABLE]
    assert len(names) > 40 and {"courier.app.web.api", "courier.tasks.deliver", "courier.migrations"} <= set(names)
    for name in names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name in OPTIONAL and importlib.util.find_spec(exc.name) is None:
                continue  # python-hl7 comes with courier[mllp]; this JSON-only host did not ask for it
            raise
        assert Path(module.__file__).resolve().is_relative_to(SITE_PACKAGES / "courier"), name
        leaks = [attr for attr, value in vars(module).items() if _origin(value).split(".")[0] in HOST_PACKAGES]
        assert leaks == [], f"{name} holds the host's {leaks}: it imported a top-level app/tasks/migrations"
    for host_name in HOST_PACKAGES:
        assert Path(sys.modules[host_name].__file__).resolve().is_relative_to(HOST_DIR), host_name
    assert "adapters" not in sys.modules  # nothing asked for a top-level `adapters` (Courier's are courier.adapters)


def test_courier_console_script_runs_with_the_host_first_on_the_path(migrated):
    env = host_env(migrated, PYTHONPATH=str(HOST_DIR))
    result = run([str(BIN / "courier"), "--help"], env)
    for command in ("config", "db", "relay", "replay", "tokens"):
        assert f"  {command} " in result.stdout, result.stdout

    ok = run([str(BIN / "courier"), "config", "check"], {**env, "COURIER_CONFIG": "app/courier.yml",
                                                         "DATABASE_URL": migrated})
    assert ok.stdout.strip() == "app/courier.yml: ok (1 sources, 1 destinations, 1 routes)", ok.stdout


def test_courier_config_check_reads_the_hosts_file_and_refuses_a_broken_one(migrated, tmp_path):
    broken = tmp_path / "courier.yml"
    broken.write_text((HOST_DIR / "app" / "courier.yml").read_text().replace("to: [erp]", "to: [warehouse]"))
    env = host_env(migrated, PYTHONPATH=str(HOST_DIR), COURIER_CONFIG=str(broken), DATABASE_URL=migrated)
    result = run([str(BIN / "courier"), "config", "check"], env, check=False)
    assert result.returncode == 1, result
    assert f"{broken}:" in result.stderr and "warehouse" in result.stderr, result.stderr


def test_the_hosts_flask_cli_has_couriers_commands_with_the_hosts_routing(migrated, tmp_path):
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"type": "supply.consumed", "data": {"sku": "gauze-10", "quantity": 1}}))
    result = run([str(BIN / "flask"), "--app", "app", "courier", "routes", "test", str(event)], host_env(migrated))
    assert "1 message from source supply-room as application/json" in result.stdout, result.stdout
    assert "=== erp (http, clearance phi, transform passthrough)" in result.stdout, result.stdout
