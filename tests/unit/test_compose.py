"""docker-compose.yml runs what the Procfile runs (no Docker engine here to run compose itself)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from courier.tasks.install import read_procfile

ROOT = Path(__file__).resolve().parents[2]


def test_every_procfile_process_is_a_compose_service_with_the_same_command():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, command in read_procfile((ROOT / "Procfile").read_text()).items():
        assert name in services, f"compose has no service {name!r}"
        # compose binds fixed ports where the Procfile reads ${PORT:-8000}, and Flower listens on all interfaces
        # inside its container (published on 127.0.0.1 only); the rest of the command must be the same.
        normalise = lambda c: re.sub(r"\$\{PORT:-(\d+)\}", r"\1", c).replace("'", '"').split()  # noqa: E731
        theirs = [w for w in normalise(services[name]["command"]) if not w.startswith(("--address=", "--port="))]
        ours = [w for w in normalise(command.removeprefix("exec ")) if not w.startswith(("--address=", "--port="))]
        assert theirs == ours, name
