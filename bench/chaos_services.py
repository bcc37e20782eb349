"""The failure suites' own PostgreSQL clusters, RabbitMQ nodes and small disk, on other ports.

The machine's services (PostgreSQL 5432, RabbitMQ 5672) are shared with other
test runs and must stay up, so the suite restarts only what it started here:

- `PgCluster`: `initdb` into a temporary directory, trust auth, listening on
  127.0.0.1:PORT with its socket in the same directory. initdb and postgres
  refuse to run as root, so as root they run as the `postgres` user (runuser).
  `standby_of=` makes a streaming standby of another one instead (pg_basebackup -R),
  which `promote()` turns into a primary (bench/cluster.py).
- `RabbitNode`: a second node `chaos-<tag>@localhost` with its own data, log,
  config and (empty) plugin files, AMQP on PORT and distribution on PORT+1.
  It shares the machine's epmd, which is fine: epmd only maps names to ports.
  rabbitmqctl must get the same environment, or it computes its own
  distribution ports from the defaults (35672-35682, the machine node's CLI
  range) and may take the port we asked for. Boots in about 10 s on 2 loaded cores.
  Nodes given one `cookie` can `join()` each other's cluster (bench/cluster.py).
- `TmpfsDir`: a small tmpfs, so "disk full" fills a few MB and nothing else
  (needs root for mount; `available()` says whether it can be done).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def missing_services() -> str | None:
    """Why the suite cannot run here, or None."""
    if pg_bin() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        return f"no {RABBIT_BIN}/rabbitmq-server"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (initdb refuses root)"
    return None


class PgCluster:
    def __init__(self, base: Path, port: int, name: str = "pg", standby_of: "PgCluster | None" = None):
        """A new cluster in `base`/`name`, or with `standby_of` a streaming standby of that (running) primary,
        copied with pg_basebackup and connecting as application_name `name` (for synchronous_standby_names)."""
        self.bin, self.dir, self.port, self.name = pg_bin(), base / name, port, name
        self.data = self.dir / "data"
        self.dir.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        if standby_of is None:
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])
            return
        self._run([str(self.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(standby_of.port), "-U", "postgres",
                   "-D", str(self.data), "-X", "stream", "-R", "--checkpoint=fast", "--no-sync"])
        conninfo = f"host=127.0.0.1 port={standby_of.port} user=postgres application_name={name}"
        with open(self.data / "postgresql.auto.conf", "a") as conf:  # the last setting of a name wins
            conf.write(f"primary_conninfo = '{conninfo}'\n")

    def promote(self) -> None:
        """Make this standby a primary (what a failover tool does after the primary is lost)."""
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "promote"])

    def _run(self, argv: list[str]) -> str:
        out = subprocess.run(_as_postgres(argv), capture_output=True, text=True, cwd="/")
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {out.stdout}{out.stderr}")
        return out.stdout

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200",
                   "start"])

    def stop(self, mode: str = "fast") -> None:
        """fast: disconnect clients, checkpoint; immediate: like a crash (WAL recovery on the next start)."""
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")


class RabbitNode:
    def __init__(self, base: Path, port: int, tag: str, name: str = "rabbit", cookie: str | None = None):
        """`name`: the node's folder under `base` (and part of its node name); `cookie`: the Erlang cookie,
        which the nodes of one cluster must share (None: RabbitMQ makes one)."""
        self.dir, self.port = base / name, port
        self.node = f"chaos-{tag}@localhost" if name == "rabbit" else f"{name}-{tag}@localhost"
        self.dir.mkdir()
        if cookie is not None:
            path = self.dir / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ, "HOME": str(self.dir),  # the Erlang cookie lives here, for server and rabbitmqctl
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_DIST_PORT": str(port + 1),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(port + 2), "RABBITMQ_CTL_DIST_PORT_MAX": str(port + 12),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.dir)

    def start(self, timeout: float = 120) -> float:
        """Start the node and wait until it serves AMQP; returns the boot time in seconds."""
        t0 = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "pid").unlink()
        log = open(self.dir / "server.out", "ab")
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.dir, start_new_session=True)
        log.close()
        out = self.ctl("wait", str(self.dir / "pid"), "--timeout", str(int(timeout)), timeout=timeout + 10)
        if out.returncode != 0:
            raise RuntimeError(f"RabbitMQ node {self.node} did not boot: {out.stdout}{out.stderr}\n"
                               f"{(self.dir / 'server.out').read_text(errors='replace')[-3000:]}")
        return time.monotonic() - t0

    def join(self, other: "RabbitNode") -> None:
        """Join `other`'s cluster (this node's own data is reset; it must be running)."""
        for args in (("stop_app",), ("reset",), ("join_cluster", other.node), ("start_app",)):
            out = self.ctl(*args)
            if out.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node}: {out.stdout}{out.stderr}")

    def stop(self) -> None:
        """A clean shutdown (`rabbitmqctl stop`)."""
        self.ctl("stop", timeout=60)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the node's process group: a crash, no shutdown at all."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=30)
            self.kill()


class TmpfsDir:
    """A directory on its own small tmpfs, so it can be filled without touching the machine's disk."""

    def __init__(self, path: Path, size: str = "64m"):
        self.path = path
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                       check=True, capture_output=True)
        self.filler = path / ".chaos-filler"

    @staticmethod
    def available() -> str | None:
        """None if a tmpfs can be mounted here, else why not."""
        if os.geteuid() != 0:
            return "not root: cannot mount a small tmpfs to fill"
        if shutil.which("mount") is None:
            return "no mount command"
        return None

    def fill(self) -> int:
        """Write zeros until the filesystem is full; returns the bytes written."""
        written = 0
        try:  # opening the filler fails too when the files already there took the last page or inode
            with open(self.filler, "wb") as f:
                block = b"\0" * 65536
                while True:
                    written += f.write(block)
                    f.flush()
        except OSError:
            pass
        # tmpfs fills by pages; small writes may still fit in a partly used page. Take those too.
        with contextlib.suppress(OSError), open(self.filler, "ab") as f:
            while True:
                f.write(b"\0" * 512)
                f.flush()
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def files(self) -> list[str]:
        return [p.name for p in self.path.iterdir() if not p.name.startswith(".")]

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
