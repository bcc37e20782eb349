"""docker-compose.yml runs what the Procfile runs (no Docker engine here to run compose itself)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name.strip(): command.strip().removeprefix("exec ") for name, _, command in (l.partition(":") for l in lines)}


def test_every_procfile_process_is_a_compose_service_with_the_same_command():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, command in procfile().items():
        assert name in services, f"compose has no service {name!r}"
        # compose binds fixed ports where the Procfile reads ${PORT:-8000}, and Flower listens on all interfaces
        # inside its container (published on 127.0.0.1 only); the rest of the command must be the same.
        normalise = lambda c: re.sub(r"\$\{PORT:-(\d+)\}", r"\1", c).replace("'", '"').split()  # noqa: E731
        theirs = [w for w in normalise(services[name]["command"]) if not w.startswith(("--address=", "--port="))]
        ours = [w for w in normalise(command) if not w.startswith(("--address=", "--port="))]
        assert theirs == ours, name
