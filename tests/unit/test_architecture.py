"""The architecture holds: import-linter's contracts (pyproject.toml), no import circle between modules,
and no trace of the old top-level names or of files outside the repository.

lint-imports and grimp find a package by walking its folder, and in this checkout courier.app lives in
app/, not courier/app/ (setup.py maps it). So the checks run on a copy laid out as installed: courier/
with app/, tasks/, adapters/ and migrations/ inside, which is what a wheel holds.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("app", "tasks", "adapters", "migrations")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    """A copy of the sources as the wheel lays them out; the folder to put on PYTHONPATH."""
    top = tmp_path_factory.mktemp("layout")
    shutil.copytree(ROOT / "courier", top / "courier", ignore=shutil.ignore_patterns("__pycache__"))
    for part in PARTS:
        shutil.copytree(ROOT / part, top / "courier" / part, ignore=shutil.ignore_patterns("__pycache__"))
    return top


def run_on(layout: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return subprocess.run(argv, cwd=layout, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept(installed_layout):
    result = run_on(installed_layout, str(BIN / "lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = re.search(r"Contracts: (\d+) kept, 0 broken", result.stdout)
    assert kept and int(kept.group(1)) >= 5, result.stdout


CYCLES = """
import json, sys
import grimp
graph = grimp.build_graph("courier", exclude_type_checking_imports=True, cache_dir=None)
edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
index, low, stack, on, found = {}, {}, [], set(), []
def visit(v):  # Tarjan: every strongly connected group of more than one module is a circle
    index[v] = low[v] = len(index); stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        group = []
        while True:
            w = stack.pop(); on.discard(w); group.append(w)
            if w == v: break
        if len(group) > 1: found.append(sorted(group))
sys.setrecursionlimit(10000)
for m in sorted(edges):
    if m not in index: visit(m)
print(json.dumps({"modules": len(edges), "circles": found}))
"""


def test_no_import_circle_between_modules(installed_layout):
    """Imports inside functions count too: they hide a circle, they do not remove it."""
    result = run_on(installed_layout, sys.executable, "-c", CYCLES)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["modules"] > 40, report  # the graph really is Courier's
    assert report["circles"] == [], report["circles"]


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_nothing_imports_the_old_top_level_names():
    """Courier's code imports courier.app, courier.tasks, ...; the embedded host example is a host: its own `app`
    (tests/integration/test_embedded.py imports that one)."""
    old = re.compile(r"^\s*(?:from|import)\s+(?:app|tasks|adapters|migrations)(?:\.|\s|$)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in tracked_files()
                 if p.suffix == ".py" and "examples/embedded_host" not in str(p) and p.name != "test_embedded.py"
                 and old.search(p.read_text())]
    assert offenders == []


def test_the_repository_stands_alone():
    """No file points outside the checkout (documents and samples live in docs/ and tests/data/)."""
    outside = re.compile("|".join(re.escape(s) for s in ("../" + "shared", "shared" + "/hl7")))
    offenders = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                      if outside.search(line)]
    assert offenders == []
