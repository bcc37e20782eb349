"""Where the time goes: py-spy samples of the web, relay and worker processes during a run.

py-spy (`pip install py-spy`; not a dependency of Courier) attaches from the
outside, samples each process at `RATE` Hz without pausing it (--nonblocking)
and writes collapsed stacks ("frame;frame;... count"), one file per process
and mode (the web's gunicorn workers are included with --subprocesses).
Two modes, two py-spy instances per process:
- "cpu" (--gil): only the thread holding the GIL is sampled, so the shares
  are of the Python CPU time the process spent;
- "wall": every thread py-spy does not judge idle. A thread blocked in
  psycopg's or amqp's wait for a reply still counts, so this shows what a
  busy thread is waiting on (round trips to PostgreSQL, RabbitMQ, the sink).

From the stacks, two lists per process:
- self: the functions that were on top of the stack (where the CPU burns);
- inclusive: Courier's own functions (app/, tasks/, adapters/) and the
  library calls they make, by the share of samples they appear in.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.infra import ROOT

RATE = 100
MODES = {"cpu": "thread holding the GIL: Python CPU", "wall": "busy threads, waits for replies included"}
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def record(label: str, pid: int, seconds: float, out_dir: Path, *, gil: bool,
           subprocesses: bool = False) -> subprocess.Popen:
    """Start py-spy on `pid` for `seconds`; the stacks go to <out_dir>/<label>.stacks."""
    argv = [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(RATE),
            "--nonblocking", "--function", "--format", "raw", "--output", str(out_dir / f"{label}.stacks")]
    if subprocesses:
        argv.append("--subprocesses")
    if gil:
        argv.append("--gil")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(out_dir / f"{label}.py-spy.log", "w"))


@dataclass
class Profile:
    samples: int
    self_top: list[tuple[str, float]]       # (frame, % of samples)
    inclusive_top: list[tuple[str, float]]


def summarise(path: Path, top: int = 10) -> Profile:
    """Read a collapsed-stacks file into the top self and inclusive frames."""
    self_counts, inclusive, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        n = int(count)
        total += n
        self_counts[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    share = (lambda c: [(f, 100 * n / total) for f, n in c.most_common(top)]) if total else (lambda c: [])
    ours = Counter({f: n for f, n in inclusive.items() if f.split(" ")[-1].startswith(("app/", "tasks/", "adapters/"))
                    or _is_call_from_ours(f)})
    return Profile(total, share(self_counts), share(ours))


def _short(frame: str) -> str:
    """'func (/path/to/site-packages/pkg/mod.py:12)' -> 'func pkg/mod.py'; Courier's files relative to the repo."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match["file"]
    if file.startswith(str(ROOT) + "/"):
        file = file[len(str(ROOT)) + 1:]
    elif "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    elif "/lib/python" in file:
        file = "stdlib/" + file.split("/lib/python", 1)[1].split("/", 1)[1]
    return f"{match['func']} {file}"


LIBRARY_CALLS = ("sqlalchemy/orm/session.py", "psycopg/", "kombu/", "amqp/", "requests/sessions.py",
                 "flask/app.py", "celery/app/task.py")


def _is_call_from_ours(frame: str) -> bool:
    """Library entry points worth seeing inclusively next to Courier's functions."""
    return frame.split(" ")[0] in ("commit", "execute", "flush", "publish", "send", "request", "wait",
                                   "_execute_context", "getresponse") and frame.split(" ")[-1].startswith(LIBRARY_CALLS)
