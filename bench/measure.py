"""Measuring from the outside: /proc for memory and CPU, the machine's description, percentiles.

Nothing here touches Courier's code. Memory is the resident set size (VmRSS) of
process trees, summed over a tree and sampled twice a second; the peak of the
sum is reported. CPU is read from /proc/<pid>/stat (user + system ticks) at the
start and the end of a phase, and given as "% of one core" per component, so a
2-core machine has 200% to share out. Processes that are not the benchmark's,
PostgreSQL's or RabbitMQ's end up as "other": that is the noise from other
people's work on the machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- process trees -------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm)"


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in all_pids():
        fields = _stat_fields(pid)
        if fields:
            kids.setdefault(int(fields[1]), []).append(pid)
    return kids


def tree(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """`root` and all its descendants."""
    kids = kids if kids is not None else children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[21]) * PAGE if fields else 0  # field 24 of stat: rss in pages


def cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0  # utime + stime


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# -- memory --------------------------------------------------------------------

class RssSampler:
    """Samples the summed RSS of labelled process trees in a thread; `peak` and `peak_by_label` after."""

    def __init__(self, roots: dict[str, int], interval: float = 0.5):
        self.roots, self.interval = roots, interval
        self.peak, self.peak_by_label = 0, {label: 0 for label in roots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            kids = children_map()
            by_label = {label: sum(rss_bytes(p) for p in tree(root, kids)) for label, root in self.roots.items()}
            for label, value in by_label.items():
                self.peak_by_label[label] = max(self.peak_by_label[label], value)
            self.peak = max(self.peak, sum(by_label.values()))
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- CPU -----------------------------------------------------------------------

def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine, all cores, since boot (not idle, not iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


SERVICES = {"postgres": "postgres", "beam.smp": "rabbitmq", "erl_child_setup": "rabbitmq", "epmd": "rabbitmq"}


class CpuAccount:
    """CPU used during a phase, per component: the labelled trees, the services, and everything else.

    `roots` maps labels to process-tree roots, in order of precedence: list the harness itself
    last, since every process it started is in its tree. A root labelled like a service (e.g.
    "postgres": the benchmark's own cluster's postmaster) replaces the match by process name, so
    another cluster on the machine (other people's tests) counts as "other".
    """

    def __init__(self, roots: dict[str, int]):
        self.roots = roots
        self.result: dict[str, float] = {}  # % of one core
        self.seconds: dict[str, float] = {}  # CPU seconds used

    def per_message(self, messages: int) -> dict[str, float]:
        """CPU-ms per message of each component (none if no message went through)."""
        return {label: 1000 * sec / messages for label, sec in self.seconds.items()} if messages else {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        kids, labels = children_map(), {}
        for label, root in self.roots.items():  # in order: a later root's tree never relabels an earlier one's
            for pid in tree(root, kids):
                labels.setdefault(pid, label)
        snap = {}
        for pid in all_pids():
            label = labels.get(pid) or (None if SERVICES.get(comm(pid)) in self.roots else SERVICES.get(comm(pid)))
            if label:
                snap[pid] = (label, cpu_seconds(pid))
        return snap

    def __enter__(self) -> "CpuAccount":
        self._t0, self._busy0, self._before = time.monotonic(), busy_cpu_seconds(), self._snapshot()
        return self

    def __exit__(self, *exc) -> None:
        after, wall = self._snapshot(), time.monotonic() - self._t0
        used: dict[str, float] = {}
        for pid, (label, cpu) in after.items():
            used[label] = used.get(label, 0.0) + cpu - self._before.get(pid, (label, 0.0))[1]
        busy = busy_cpu_seconds() - self._busy0
        used["other"] = max(busy - sum(used.values()), 0.0)
        self.seconds = used
        self.result = {label: 100 * seconds / wall for label, seconds in used.items()}
        self.result["idle"] = max(100 * os.cpu_count() - 100 * busy / wall, 0.0)


# -- the machine ---------------------------------------------------------------

def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def machine(pg_version: str, rabbit_version: str) -> dict[str, str]:
    """What a reader needs to compare runs: hardware, versions, and the code that ran."""
    mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")).split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    libs = ", ".join(f"{name} {metadata.version(name)}" for name in
                     ("flask", "gunicorn", "celery", "kombu", "sqlalchemy", "psycopg", "requests"))
    root = Path(__file__).resolve().parents[1]
    commit = _git(root, "rev-parse", "--short", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--", "app", "tasks", "adapters", "migrations")
    return {
        "cores": f"{os.cpu_count()} ({cpu})",
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "rabbitmq": rabbit_version,
        "libraries": libs,
        "code": f"{commit}" + (" + uncommitted changes in app/, tasks/ or adapters/" if dirty else ""),
    }


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return out.stdout.strip()


# -- numbers -------------------------------------------------------------------

def percentiles(values: list[float], points=(50, 95, 99)) -> dict[int, float]:
    """Nearest-rank-interpolated percentiles; NaN for an empty list."""
    if len(values) < 2:
        return {p: (values[0] if values else float("nan")) for p in points}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {p: cuts[p - 1] for p in points}
