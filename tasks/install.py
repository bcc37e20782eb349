"""`courier install systemd`: systemd units for a single-VM install (docs/install.md).

One unit per Procfile process (courier-web.service, courier-worker.service, ...), a oneshot
courier-migrate.service for the Procfile's `release` step that every other unit requires and
is ordered after, and courier.target, which groups them: `systemctl enable --now courier.target`
starts everything, `systemctl stop courier.target` stops everything (PartOf=).

The ExecStart lines are made from the Procfile of the app directory at generation time, not
from a table kept here: the Procfile is what `make run` and honcho run, so reading it means
the units cannot drift from it (a table would need its own test to notice, and only in this
repository, not on a VM whose checkout changed). The price is a translation from the
Procfile's shell syntax to systemd's, and it accepts only the part of shell whose meaning
it knows: words, quotes, backslashes, a leading `exec`, and `$VAR`, `${VAR}` and
`${VAR:-default}`. `${VAR:-default}` becomes `${VAR}` with `Environment=VAR=default`
(systemd has no `:-`; the EnvironmentFile= overrides Environment= whatever their order, so
the secrets file can still set VAR; unlike the shell, an empty VAR= there stays empty).
Anything else (pipes, `;`, `&&`, redirections, `$(...)`, globs, VAR=value prefixes) is refused
with the process's name, rather than passed to systemd, which would not run it as a shell does.
The program, the first word, becomes an absolute path into the venv (systemd requires one).

Nothing is written until every unit has been made: bad input (the prefix is a file, no venv,
no Procfile, a Procfile line that cannot be translated) is a one-line error and an untouched
prefix directory.
"""
from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click

DEFAULT_ENV_FILE = "/etc/courier/courier.env"
DEFAULT_USER = "courier"
# Started before the processes when present on this machine; Wants=, so a remote database or
# broker (no such unit here) is no error.
NEIGHBOURS = ("network-online.target", "postgresql.service", "rabbitmq-server.service")
MIGRATE = "courier-migrate.service"
TARGET = "courier.target"

DESCRIPTIONS = {
    "web": "Courier web: the HTTP API (gunicorn)",
    "worker": "Courier worker: deliveries to destinations (Celery)",
    "relay": "Courier relay: the outbox to RabbitMQ",
    "beat": "Courier beat: periodic tasks (Celery beat)",
    "flower": "Courier Flower: the Celery dashboard, behind basic auth",
    "mllp": "Courier MLLP listener: HL7 v2 in",
}
# How long SIGTERM may take before SIGKILL, per process (seconds; 30 for any other process).
STOP_TIMEOUTS = {
    "web": 45,     # gunicorn's graceful_timeout (30s) for requests in hand, and the master's own exit
    "worker": 90,  # Celery's warm shutdown finishes the tasks in hand, each bounded by its destination's timeout
    "relay": 30,   # finishes the round in hand
    "mllp": 40,    # drains connections for up to its stop grace (20s), then its store threads
    "beat": 15,
    "flower": 15,
}
# Exit statuses that restarting cannot fix. `courier flower` exits 2 (a usage error) without
# FLOWER_BASIC_AUTH: restarting every few seconds forever would only fill the journal.
NO_RESTART_ON = {"flower": "2"}

# The same hardening for every unit. Files are written only under instance/ (the SQLite store,
# the metrics files, beat's schedule): everything else is read-only (ProtectSystem=strict).
# Left out: MemoryDenyWriteExecute= (cffi's callbacks need writable code pages) and
# SystemCallFilter= (not verifiable here without running every process under it).
HARDENING = """\
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectSystem=strict
ReadWritePaths={instance}
ProtectHome={protect_home}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
UMask=0077
"""

ENV_EXAMPLE = """\
# Courier's environment, read by every courier-*.service (EnvironmentFile={env_file}).
# systemd reads it as root before it starts each process as {user}: keep it root's alone, mode 0600:
#   install -d -m 755 {env_dir}
#   install -m 600 -o root -g root courier.env.example {env_file}
# One VAR=value a line, no `export`; lines starting with # are ignored. Put a value holding
# spaces, quotes, $ or \\ in single quotes (kept verbatim): PASSWORD='a$b c'.

# The outbox store (SQLAlchemy URL). The default, sqlite:///instance/courier.db, is for trying Courier out.
DATABASE_URL=postgresql+psycopg://courier:CHANGE-ME@localhost:5432/courier
# RabbitMQ.
BROKER_URL=amqp://courier:CHANGE-ME@localhost:5672//
# The routing file: sources, destinations, routes (check it with `courier config check`).
COURIER_CONFIG=/etc/courier/courier.yml
# Encryption at rest: make a key with `courier keys generate`. Keep every key you have used:
# without it stored bodies cannot be read. Unset: bodies are stored in clear.
#COURIER_ENCRYPTION_KEY=
# The key of keyed pseudonyms, at least 32 characters (`openssl rand -base64 32`); routes with
# pseudonymised destinations need it, and changing it changes every pseudonym.
#COURIER_PSEUDONYM_KEY=
# Flower's basic auth, user:password (several separated by commas). courier-flower refuses to
# start without it; there is no default password.
FLOWER_BASIC_AUTH=admin:CHANGE-ME
# Error reports to Sentry (optional).
#SENTRY_DSN=
# Ports: the HTTP API (all interfaces), the MLLP listener (all interfaces), Flower (127.0.0.1 only).
# The values shown are the defaults.
#PORT=8000
#MLLP_PORT=2575
#FLOWER_PORT=5555
# MLLP listener processes sharing MLLP_PORT, one core each (the Procfile's default; see docs/hl7.md).
#COURIER_MLLP_PROCESSES=2
"""

# Characters that a path in a unit file would need escaping for (specifiers, variables, quoting, spaces).
_UNSAFE_PATH = re.compile(r"[\s%$\\'\";]")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
_NAME = re.compile(r"[A-Za-z0-9_]+")
_PROCESS = re.compile(r"[A-Za-z0-9_-]+")
# A home directory tree: ProtectHome=yes would hide an app or venv installed there.
_HOMES = ("/home", "/root", "/run/user")


class InstallError(click.ClickException):
    """Bad input: `Error: <message>` on one line, exit 1, nothing written."""


# --- the Procfile ----------------------------------------------------------------------

def read_procfile(text: str) -> dict[str, str]:
    """`name: command` lines in order (comments and blank lines skipped), as honcho reads them."""
    processes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        name = name.strip()
        if not sep or not _PROCESS.fullmatch(name) or not command.strip():
            raise InstallError(f"Procfile line {number}: not `name: command`: {line.strip()!r}")
        if name in processes:
            raise InstallError(f"Procfile line {number}: process {name!r} appears twice")
        processes[name] = command.strip()
    return processes


@dataclass
class Command:
    """A Procfile command for systemd: the words (with systemd's `${VAR}`, `$$` and `%%`) and VAR defaults."""

    words: list[str]
    defaults: dict[str, str] = field(default_factory=dict)


def _shell_words(name: str, command: str) -> list[list[tuple[str, bool]]]:
    """Split `command` as a POSIX shell would; each word is (text, expands) chunks: expands=False when quoted '...'.

    Refuses what this translation does not support (see the module docstring).
    """
    def refuse(what: str) -> InstallError:
        return InstallError(f"Procfile process {name!r}: {what} is not supported in a systemd unit: {command}")

    words: list[list[tuple[str, bool]]] = []
    word: list[tuple[str, bool]] | None = None
    i = 0

    def add(text: str, expands: bool) -> None:
        nonlocal word
        if word is None:
            word = []
            words.append(word)
        word.append((text, expands))

    while i < len(command):
        c = command[i]
        if c in " \t":
            word = None
            i += 1
        elif c == "'":
            end = command.find("'", i + 1)
            if end < 0:
                raise refuse("an unterminated quote")
            add(command[i + 1:end], False)
            i = end + 1
        elif c == '"':
            i += 1
            text = ""
            while i < len(command) and command[i] != '"':
                if command[i] == "\\" and i + 1 < len(command) and command[i + 1] in '$`"\\':
                    add(text, True)
                    add(command[i + 1], False)  # an escaped character is literal
                    text, i = "", i + 2
                    continue
                if command[i] == "`":
                    raise refuse("command substitution")
                text += command[i]
                i += 1
            if i >= len(command):
                raise refuse("an unterminated quote")
            add(text, True)
            i += 1
        elif c == "\\":
            if i + 1 >= len(command):
                raise refuse("a trailing backslash")
            add(command[i + 1], False)
            i += 2
        elif c in ";&|<>`()":
            raise refuse(f"the shell operator {c!r}")
        elif c in "*?[" or (c == "~" and word is None):
            raise refuse(f"the shell expansion {c!r}")
        elif c == "#" and word is None:
            raise refuse("a comment")
        else:
            start = i
            while i < len(command) and command[i] not in " \t'\"\\;&|<>`()*?[":
                i += 1
            add(command[start:i], True)
    return words


_EXPANSION = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}$`]*))?")


def translate(name: str, command: str) -> Command:
    """The Procfile `command` of process `name` in systemd's ExecStart syntax (words not yet quoted)."""
    defaults: dict[str, str] = {}
    out: list[str] = []

    def unexpanded(text: str) -> str:
        if "$" in text:
            raise InstallError(f"Procfile process {name!r}: a $ that is not $VAR, ${{VAR}} or ${{VAR:-default}} "
                               f"is not supported in a systemd unit: {command}")
        return literal(text)

    def expand(text: str) -> str:
        pieces, last = [], 0
        for m in _EXPANSION.finditer(text):
            pieces.append(unexpanded(text[last:m.start()]))
            last = m.end()
            if m["bare"]:
                pieces.append("${%s}" % m["bare"])
                continue
            braced = _BRACED.fullmatch(m["braced"])
            if not braced:
                raise InstallError(f"Procfile process {name!r}: ${{{m['braced']}}} is not supported in a systemd "
                                   f"unit (only $VAR, ${{VAR}} and ${{VAR:-default}}): {command}")
            var, default = braced["var"], braced["default"]
            if default is not None:
                if defaults.get(var, default) != default:
                    raise InstallError(f"Procfile process {name!r}: two defaults for ${var}: {command}")
                defaults[var] = default
            pieces.append("${%s}" % var)
        pieces.append(unexpanded(text[last:]))
        return "".join(pieces)

    def literal(text: str) -> str:
        return text.replace("%", "%%").replace("$", "$$")

    words = _shell_words(name, command)
    if words and words[0] == [("exec", True)]:  # the Procfile's `exec`: systemd runs the program itself anyway
        words = words[1:]
    if not words:
        raise InstallError(f"Procfile process {name!r}: no command")
    for word in words:
        out.append("".join(expand(text) if expands else literal(text) for text, expands in word))
    if "=" in out[0] and _NAME.fullmatch(out[0].split("=", 1)[0]):
        raise InstallError(f"Procfile process {name!r}: VAR=value before the command is not supported in a "
                           f"systemd unit: {command}")
    return Command(out, defaults)


def _quote(word: str) -> str:
    """`word` as one ExecStart word (systemd.syntax(7) quoting)."""
    if word and not re.search(r"[\s\"'\\]", word) and word != ";":
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- the units -------------------------------------------------------------------------

@dataclass
class Layout:
    """Where things are on the VM (all absolute)."""

    app_dir: Path
    venv: Path
    user: str = DEFAULT_USER
    env_file: str = DEFAULT_ENV_FILE

    @property
    def instance(self) -> Path:
        return self.app_dir / "instance"

    def interpreter(self) -> Path:
        """The venv's Python as the kernel finds it (a venv's bin/python is a symlink to its base Python)."""
        return (self.venv / "bin" / "python").resolve()

    def code_paths(self) -> tuple[Path, ...]:
        return (self.app_dir, self.venv, self.interpreter())

    def program(self, name: str, word: str) -> str:
        """The absolute path of a command's program: a bare name is the venv's."""
        if word.startswith("/"):
            path = Path(word)
        elif "/" in word or "$" in word or "%" in word:
            raise InstallError(f"Procfile process {name!r}: the program {word!r} must be a name in the venv's "
                               f"bin/ or an absolute path")
        else:
            path = self.venv / "bin" / word
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise InstallError(f"Procfile process {name!r}: {path} is not an executable file "
                               f"(is --venv {self.venv} the venv Courier is installed in?)")
        return str(path)


def _unit_name(process: str) -> str:
    return MIGRATE if process == "release" else f"courier-{process}.service"


def _service(process: str, command: Command, layout: Layout, procfile: Path) -> str:
    words = [layout.program(process, command.words[0]), *command.words[1:]]
    release = process == "release"
    home = any(str(p) == h or str(p).startswith(h + "/") for p in layout.code_paths() for h in _HOMES)
    description = ("Courier migrate: the store schema (courier db upgrade)" if release
                   else DESCRIPTIONS.get(process, f"Courier {process} (Procfile)"))
    lines = [
        f"# Made by `courier install systemd` from {procfile} ({process}); make it again rather than edit it.",
        "[Unit]",
        f"Description={description}",
        f"Documentation=file://{layout.app_dir}/docs/install.md",
        f"PartOf={TARGET}",
    ]
    if release:
        lines += [f"After={' '.join(NEIGHBOURS)}"]
    else:
        # Requires=: a failed migration leaves the processes stopped rather than on an old schema.
        lines += [f"Requires={MIGRATE}", f"After={MIGRATE} {' '.join(NEIGHBOURS)}"]
    lines += [f"Wants={' '.join(NEIGHBOURS)}", "", "[Service]"]
    lines += ["Type=oneshot", "RemainAfterExit=yes"] if release else ["Type=exec"]
    lines += [
        f"User={layout.user}",
        f"Group={layout.user}",
        f"WorkingDirectory={layout.app_dir}",
        # The logs reach the journal line by line, not in 8 KiB blocks.
        "Environment=PYTHONUNBUFFERED=1",
        *(f"Environment={_quote(f'{var}={value}'.replace('%', '%%'))}"
          for var, value in sorted(command.defaults.items())),
        # Read by systemd as root, and it overrides the Environment= lines above.
        f"EnvironmentFile={layout.env_file}",
        "ExecStart=" + " ".join(_quote(w) for w in words),
    ]
    if not release:
        lines += ["Restart=on-failure", "RestartSec=5"]
        if process in NO_RESTART_ON:
            lines.append(f"RestartPreventExitStatus={NO_RESTART_ON[process]}")
    lines += [
        # SIGTERM to the main process only (gunicorn's master stops its workers), SIGKILL to all after the timeout.
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUTS.get(process, 30)}",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier={_unit_name(process).removesuffix('.service')}",
    ]
    lines.append("# Hardening: files are written under instance/ only; see tasks/install.py.")
    if home:
        lines.append("# ProtectHome=read-only, not yes: the app, its venv or its Python is under a home directory.")
    lines += HARDENING.format(instance=layout.instance, protect_home="read-only" if home else "yes").splitlines()
    if not release:
        lines += ["", "[Install]", f"WantedBy={TARGET}"]
    return "\n".join(lines) + "\n"


def _target(services: list[str], layout: Layout) -> str:
    return "\n".join([
        "# Made by `courier install systemd`: every Courier process; `systemctl enable --now courier.target`.",
        "[Unit]",
        "Description=Courier: every process (web, worker, relay, beat, flower, mllp, ...)",
        f"Documentation=file://{layout.app_dir}/docs/install.md",
        # The processes are pulled in through their [Install] WantedBy=courier.target, so one can be
        # left out with `systemctl disable courier-NAME`; they pull in courier-migrate.service themselves.
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        f"Also={' '.join(services)}",
    ]) + "\n"


def systemd_units(procfile_text: str, layout: Layout, procfile: Path) -> dict[str, str]:
    """File name -> content of every unit, for the Procfile text `procfile_text`."""
    processes = read_procfile(procfile_text)
    if "release" not in processes:
        raise InstallError(f"{procfile}: no release process (the migration every other process waits for)")
    if "migrate" in processes:
        raise InstallError(f"{procfile}: a process named migrate would clash with {MIGRATE} (the release step)")
    units = {_unit_name(p): _service(p, translate(p, cmd), layout, procfile) for p, cmd in processes.items()}
    services = [_unit_name(p) for p in processes if p != "release"]
    if not services:
        raise InstallError(f"{procfile}: no process besides release")
    units[TARGET] = _target(services, layout)
    return units


# --- the command -----------------------------------------------------------------------

def _write(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` with `mode` from the first byte (a temporary file in the same directory, renamed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _closed_parent(path: Path) -> Path | None:
    """The first directory above `path` that other users may not enter (no o+x), if any."""
    for parent in reversed(path.parents):
        try:
            if not parent.stat().st_mode & stat.S_IXOTH:
                return parent
        except OSError:
            return None
    return None


def _absolute(option: str, value: str) -> Path:
    path = Path(os.path.abspath(value))
    if _UNSAFE_PATH.search(str(path)):
        raise InstallError(f"{option} {path}: spaces, quotes, %, $, ; and \\ are not supported in unit file paths")
    return path


@click.group("install")
def install_group():
    """Install Courier on this machine (systemd units for a single-VM install)."""


@install_group.command("systemd")
@click.option("--prefix", required=True, metavar="DIR",
              help="where to write the units, e.g. /etc/systemd/system (created if missing)")
@click.option("--user", default=DEFAULT_USER, show_default=True,
              help="the system user (and group) the processes run as")
@click.option("--app-dir", default=".", show_default="the current directory",
              help="the Courier checkout the processes run in (its Procfile, deploy/, instance/)")
@click.option("--venv", default=sys.prefix, show_default="this courier's venv", help="the venv Courier is installed in")
@click.option("--env-file", default=DEFAULT_ENV_FILE, show_default=True,
              help="the secrets file the units read (root's, mode 0600)")
def install_systemd(prefix: str, user: str, app_dir: str, venv: str, env_file: str):
    """Write courier-*.service for each Procfile process, courier-migrate.service and courier.target into DIR.

    Also DIR/courier.env.example (mode 0600): the variables to put in --env-file. Nothing is
    written if any of it cannot be made. See docs/install.md.
    """
    if not _USER.fullmatch(user):
        raise InstallError(f"--user {user!r}: not a system user name (lower case letters, digits, _ and -)")
    target_dir = _absolute("--prefix", prefix)
    if target_dir.exists() and not target_dir.is_dir():
        raise InstallError(f"--prefix {target_dir}: not a directory")
    layout = Layout(_absolute("--app-dir", app_dir), _absolute("--venv", venv), user,
                    str(_absolute("--env-file", env_file)))
    if not layout.venv.is_dir():
        raise InstallError(f"--venv {layout.venv}: no such directory")
    if not (layout.venv / "bin" / "python").exists():
        raise InstallError(f"--venv {layout.venv}: not a venv (no bin/python)")
    procfile = layout.app_dir / "Procfile"
    if not procfile.is_file():
        raise InstallError(f"--app-dir {layout.app_dir}: no Procfile (the app dir is a Courier checkout)")
    units = systemd_units(procfile.read_text(), layout, procfile)
    env_dir = os.path.dirname(layout.env_file)
    example = ENV_EXAMPLE.format(env_file=layout.env_file, env_dir=env_dir, user=user)

    if target_dir.is_dir() and not os.access(target_dir, os.W_OK | os.X_OK):
        raise InstallError(f"--prefix {target_dir}: not writable by this user")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            _write(target_dir / name, text, 0o644)
        # Placeholders only, but it is the file an operator fills in: never readable by others.
        _write(target_dir / "courier.env.example", example, 0o600)
    except OSError as exc:
        raise InstallError(f"--prefix {target_dir}: {exc.strerror or exc}") from None
    for name in [*units, "courier.env.example"]:
        click.echo(str(target_dir / name))
    closed = _closed_parent(layout.interpreter())
    if closed:
        click.echo(f"warning: {closed} is closed to other users (mode {stat.S_IMODE(closed.stat().st_mode):o}), so "
                   f"{user} cannot run {layout.interpreter()}: make the venv from a system Python", err=True)
    if not layout.instance.is_dir():
        click.echo(f"warning: {layout.instance} does not exist: create it for {user} before starting "
                   f"(install -d -o {user} -g {user} -m 750 {layout.instance})", err=True)
    try:
        st = os.stat(layout.env_file)
    except OSError:
        click.echo(f"next: install -m 600 -o root -g root {target_dir / 'courier.env.example'} {layout.env_file}, "
                   "fill it in, then systemctl daemon-reload", err=True)
    else:
        if st.st_uid != 0 or st.st_mode & 0o077:
            click.echo(f"warning: {layout.env_file} holds secrets: make it root's, mode 0600 "
                       f"(chown root:root {layout.env_file}; chmod 600 {layout.env_file})", err=True)
