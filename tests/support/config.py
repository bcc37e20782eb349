"""Routing files and Settings for tests: what the fixtures, the process helpers and bench/ build on."""
from __future__ import annotations

from pathlib import Path

import yaml

from courier.app.config import load_routing, load_settings
from tests.support.services import BROKER_URL


def write_config(path: Path, destinations: dict[str, str], routes: list[tuple[str, str, list[str]]] | None = None,
                 allowed_types: list[str] | None = None, **destination_options) -> Path:
    """A routing file with sources `lab` and `other` (no routes); by default every type of `lab` goes everywhere.

    Destinations have clearance phi unless told otherwise: they get messages as received
    (passthrough), which the configuration check allows only to destinations cleared for PHI.
    """
    routes = routes if routes is not None else [("lab", "*", list(destinations))]
    options = {"clearance": "phi", "timeout": "2s", "retry": {"max_attempts": 3, "initial": "100ms", "max": "1s"},
               **destination_options}
    doc = {
        "sources": {"lab": {"allowed_types": allowed_types or ["*"]}, "other": {}},
        "destinations": {name: {"url": url, **options} for name, url in destinations.items()},
        "routes": [{"match": {"source": s, "type": t}, "to": to} for s, t, to in routes],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def settings_for(config_path: Path, database_url: str, queue_prefix: str, **overrides):
    return load_settings(env={}, config_path=str(config_path), routing=load_routing(config_path, {}),
                         database_url=database_url, broker_url=BROKER_URL, queue_prefix=queue_prefix,
                         **overrides)
