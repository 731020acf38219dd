"""A private Cyrus IMAP server (Debian `cyrus-imapd`) on loopback, for the compatibility tests.

Like the Dovecot sandbox, everything lives in a working directory written from scratch:
`imapd.conf`, `cyrus.conf`, the mail spool, Cyrus's databases, and a SASL password database
(`sasldb2`, filled with `saslpasswd2 -f`). Passwords are really checked (auxprop/sasldb),
so wrong-password tests mean something. Nothing under /etc or /var is used: every Cyrus
program is started with `-C <our imapd.conf>` (the master does not pass it on by itself).

Cyrus refuses to run as root: as root, every process runs as `unprivileged_user` (default
`nobody`) and the working directory belongs to it; otherwise everything runs as the current
user.

The programs come from Debian's cyrus-common, cyrus-imapd and cyrus-pop3d (Cyrus's own POP3
server, `pop3=True`: the "old server" of the UIDL import tests). cyrus-imapd and cyrus-pop3d
conflict with Dovecot's IMAP and POP3 packages, so scripts/install-deps unpacks all three into
UNPACKED_CYRUS_DIR instead of installing them (their shared libraries are installed as packages; Cyrus's own libraries are
found through LD_LIBRARY_PATH); installed packages are used when both are there. Cyrus logs only to syslog; the master's own stdout/stderr go to
`master.log` in the working directory.

Differences from the Dovecot sandbox that tests see: folders are `/`-separated personal
folders next to INBOX (altnamespace, unixhierarchysep), a user's INBOX is created at its
first login, and `expunge_mode` is Cyrus's default ("delayed": expunged messages vanish
from IMAP at once and from disk later).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sandbox.netcheck import LOOPBACK, greets, pick_free_ports, port_closed
from sandbox.seeding import AppendResult, ImapObserver, append_messages

__all__ = ["CyrusError", "CyrusMailbox", "CyrusNotInstalledError", "CyrusSandbox"]

_DEBIAN_PACKAGES = "cyrus-common cyrus-imapd cyrus-pop3d sasl2-bin"
_CYRUS_BIN_DIRS = ("/usr/lib/cyrus/bin", "/usr/libexec/cyrus-imapd", "/usr/lib/cyrus-imapd")
# Where scripts/install-deps unpacks cyrus-common and cyrus-imapd (see the module docstring).
UNPACKED_CYRUS_DIR = Path("/usr/local/lib/pop3-imap-bridge/cyrus")
_CYRUS_PROGRAMS = ("master", "imapd", "pop3d", "ctl_cyrusdb")
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# The SASL realm and Cyrus's servername must agree, or sasldb finds no user; pinning both
# keeps it independent of the machine's host name.
_REALM = "cyrus-sandbox"
_USERNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNSAFE_PATH_CHARS = re.compile(r"[\s\"'%$\\{}#<>]")


class CyrusError(RuntimeError):
    """The sandbox could not do what was asked; the message says why."""


class CyrusNotInstalledError(CyrusError):
    """A Cyrus or SASL program is missing on this machine."""


def _find(name: str, dirs: Sequence[str]) -> str:
    search = os.pathsep.join([*dirs, os.environ.get("PATH", ""), *_SBIN_DIRS])
    found = shutil.which(name, path=search)
    if found is None:
        raise CyrusNotInstalledError(
            f"'{name}' not found (searched {', '.join(dirs)} and PATH). Run scripts/install-deps "
            f"(it unpacks {_DEBIAN_PACKAGES.rsplit(' ', 1)[0]} and installs sasl2-bin)."
        )
    return found


@dataclass(frozen=True)
class _CyrusPrograms:
    programs: dict[str, str]
    library_path: str | None  # LD_LIBRARY_PATH for an unpacked copy, else None


def _locate_programs() -> _CyrusPrograms:
    """Cyrus's programs: the unpacked copy (complete, one version) if there is one, else the
    installed packages; never a mix of the two."""
    unpacked_bin = UNPACKED_CYRUS_DIR / "usr/lib/cyrus/bin"
    if all((unpacked_bin / name).is_file() for name in _CYRUS_PROGRAMS):
        libraries = sorted({str(path.parent) for path in UNPACKED_CYRUS_DIR.glob("usr/lib/*/libcyrus*.so*")})
        return _CyrusPrograms({name: str(unpacked_bin / name) for name in _CYRUS_PROGRAMS}, ":".join(libraries) or None)
    return _CyrusPrograms({name: _find(name, _CYRUS_BIN_DIRS) for name in _CYRUS_PROGRAMS}, None)


def check_installation() -> None:
    """Raise :class:`CyrusNotInstalledError` unless Cyrus's programs are there and every
    shared library they need resolves."""
    located = _locate_programs()
    _find("saslpasswd2", _SBIN_DIRS)
    env = {**os.environ}
    if located.library_path:
        env["LD_LIBRARY_PATH"] = located.library_path
    for path in located.programs.values():
        linked = subprocess.run(["ldd", path], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        missing = [line.split()[0] for line in linked.stdout.splitlines() if "not found" in line]
        if linked.returncode != 0 or missing:
            raise CyrusNotInstalledError(
                f"{path} cannot run: missing shared libraries {', '.join(missing) or linked.stderr.strip()}; "
                "run scripts/install-deps"
            )


class CyrusSandbox:
    """A Cyrus IMAP server living entirely inside `workdir`; restartable, keeps its port."""

    host: str = LOOPBACK

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        imap_port: int | None = None,
        startup_timeout: float = 30.0,
        unprivileged_user: str = "nobody",
        pop3: bool = False,
    ) -> None:
        located = _locate_programs()
        self._master_bin = located.programs["master"]
        self._imapd_bin = located.programs["imapd"]
        self._pop3d_bin = located.programs["pop3d"]
        self._ctl_cyrusdb_bin = located.programs["ctl_cyrusdb"]
        self._library_path = located.library_path
        self._saslpasswd_bin = _find("saslpasswd2", _SBIN_DIRS)
        self._workdir = Path(workdir).resolve()
        if _UNSAFE_PATH_CHARS.search(str(self._workdir)):
            raise CyrusError(f"workdir {self._workdir} has characters Cyrus's config cannot take")
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(unprivileged_user)
            except KeyError:
                raise CyrusError(f"user {unprivileged_user!r} does not exist") from None
        else:
            self._run_as = pwd.getpwuid(os.getuid())
        self._imap_port, self._pop3_port = pick_free_ports(2)
        self._imap_port = imap_port or self._imap_port
        # Cyrus's pop3d, its UIDLs its own ("uidvalidity.uid"), when asked for.
        self._pop3 = pop3
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._users: dict[str, str] = {}
        self._prepare_workdir()
        # A login that may act as any user (SASL PLAIN with that user as the authorization
        # identity): Cyrus allows that to the logins in `proxyservers` (being in `admins` is
        # not enough, and not needed). Made here, not later: an idle imapd process would
        # serve later connections with the configuration it read when it started, and a
        # restart races with the old processes' listening socket.
        self.admin_login = "sandbox-admin"
        self.admin_password = secrets.token_urlsafe(12)
        self.add_user(self.admin_login, self.admin_password)

    # -- properties ------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def imap_port(self) -> int:
        return self._imap_port

    @property
    def pop3_port(self) -> int:
        """The port of Cyrus's own POP3 server (started only with `pop3=True`)."""
        if not self._pop3:
            raise CyrusError("this Cyrus runs without POP3 (CyrusSandbox(..., pop3=True))")
        return self._pop3_port

    @property
    def config_path(self) -> Path:
        return self._workdir / "imapd.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir / "master.log"

    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def users(self) -> dict[str, str]:
        return dict(self._users)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> CyrusSandbox:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the Cyrus master and return once IMAP greets."""
        if self.running:
            return
        self.config_path.write_text(self._render_imapd_conf())
        (self._workdir / "cyrus.conf").write_text(self._render_cyrus_conf())
        self._chown_tree()
        with open(self.log_path, "ab") as log:
            # Without -d the master stays in the foreground: the pid we hold is the master's.
            self._proc = subprocess.Popen(
                [
                    self._master_bin,
                    "-C", str(self.config_path),
                    "-M", str(self._workdir / "cyrus.conf"),
                    "-p", str(self._workdir / "run" / "master.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._workdir,
                env=self._environment(),
                # Its own process group: a master shutting down signals its whole group, which
                # would otherwise be ours, and take every other Cyrus the tests run with it.
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the master this object started (SIGTERM ends its children too); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        ports = [self._imap_port, self._pop3_port] if self._pop3 else [self._imap_port]
        while time.monotonic() < deadline and not all(port_closed(LOOPBACK, port) for port in ports):
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _environment(self) -> dict[str, str]:
        env = {**os.environ, "CYRUS_USER": self._run_as.pw_name}
        if self._library_path:
            # The master passes its environment on to the services it starts.
            env["LD_LIBRARY_PATH"] = self._library_path
        return env

    # -- users -------------------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """A SASL user; Cyrus creates its INBOX at the first login (autocreate_quota)."""
        if not _USERNAME_RE.fullmatch(name):
            raise ValueError(f"user name {name!r} must match {_USERNAME_RE.pattern}")
        if not password or any(c in password for c in "\r\n\0"):
            raise ValueError("password must be non-empty without CR, LF or NUL")
        if name in self._users:
            raise ValueError(f"user {name!r} already exists")
        result = subprocess.run(
            [self._saslpasswd_bin, "-f", str(self._sasldb_path), "-u", _REALM, "-p", "-c", name],
            input=password.encode(),
            capture_output=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise CyrusError(f"saslpasswd2 failed for {name}: {result.stderr.decode(errors='replace')}")
        self._chown(self._sasldb_path)
        self._users[name] = password

    def new_mailbox(self, user: str | None = None, password: str | None = None) -> CyrusMailbox:
        box = CyrusMailbox(self, user or f"u{secrets.token_hex(6)}", password or secrets.token_urlsafe(12))
        self.add_user(box.user, box.password)
        return box

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                return "\n".join(text)
        return "(no output from the Cyrus master; Cyrus logs to syslog)"

    # -- internals ---------------------------------------------------------------------------

    @property
    def _sasldb_path(self) -> Path:
        return self._workdir / "sasldb2"

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)

    def _chown_tree(self) -> None:
        if os.geteuid() != 0:
            return
        for root, dirs, files in os.walk(self._workdir):
            for name in [*dirs, *files]:
                with contextlib.suppress(FileNotFoundError):
                    os.lchown(os.path.join(root, name), self._run_as.pw_uid, self._run_as.pw_gid)
        self._chown(self._workdir)

    def _prepare_workdir(self) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        # mkdtemp() makes 0700 directories; Cyrus's processes (not root) must get in.
        self._workdir.chmod(0o755)
        for sub in ("config", "spool", "run/proc", "run/lock", "run/socket", "sieve"):
            (self._workdir / sub).mkdir(parents=True, exist_ok=True)
        for parent in self._workdir.parents:
            if not parent.stat().st_mode & 0o001:
                raise CyrusError(f"{parent} is not traversable by {self._run_as.pw_name}")
        self._chown_tree()

    def _render_imapd_conf(self) -> str:
        w = self._workdir
        return f"""\
# Written by sandbox.cyrus; regenerated on every start.
configdirectory: {w}/config
defaultpartition: default
partition-default: {w}/spool
proc_path: {w}/run/proc
mboxname_lockpath: {w}/run/lock
lmtpsocket: {w}/run/socket/lmtp
idlesocket: {w}/run/socket/idle
notifysocket: {w}/run/socket/notify
sievedir: {w}/sieve
servername: {_REALM}
cyrus_user: {self._run_as.pw_name}
syslog_prefix: cyrus-sandbox
# Real password checks against our own sasldb (saslpasswd2 -f), plain LOGIN allowed on loopback.
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {w}/sasldb2
sasl_mech_list: PLAIN LOGIN
allowplaintext: yes
# INBOX is created at a user's first login.
autocreate_quota: 0
# Cyrus pauses 3 s after a failed login by default; the wrong-password tests need no pause.
failedloginpause: 0
# Personal folders sit next to INBOX ("POP Downloaded", not "INBOX.POP Downloaded") and
# the separator is "/", as with most deployments.
altnamespace: yes
unixhierarchysep: yes
virtdomains: off
proxyservers: {self.admin_login}
"""

    def _render_cyrus_conf(self) -> str:
        conf = self.config_path
        pop3 = (
            f'  pop3 cmd="{self._pop3d_bin} -C {conf}" listen="{LOOPBACK}:{self._pop3_port}" prefork=0 maxchild=100\n'
            if self._pop3 else ""
        )
        return f"""\
# Written by sandbox.cyrus; regenerated on every start.
START {{
  recover cmd="{self._ctl_cyrusdb_bin} -C {conf} -r"
}}
SERVICES {{
  imap cmd="{self._imapd_bin} -C {conf}" listen="{LOOPBACK}:{self._imap_port}" prefork=0 maxchild=500
{pop3}}}
EVENTS {{
}}
"""

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise CyrusError(f"cyrus master exited with status {code} during start-up:\n{self.log_tail()}")
            if greets(LOOPBACK, self._imap_port, b"* OK") and (not self._pop3 or greets(LOOPBACK, self._pop3_port, b"+OK")):
                return
            if time.monotonic() > deadline:
                raise CyrusError(
                    f"cyrus did not greet on port {self._imap_port} within {self._startup_timeout:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)


@dataclass
class CyrusMailbox:
    """One user's INBOX on a :class:`CyrusSandbox` (the same interface as the Dovecot
    sandbox's Mailbox, minus the native POP3 server)."""

    server: CyrusSandbox
    user: str
    password: str
    _closers: list[Callable[[], object]] = field(default_factory=list, repr=False)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def imap_port(self) -> int:
        return self.server.imap_port

    def append(self, messages: Iterable[bytes], *, flags: Sequence[str] = (), mailbox: str = "INBOX") -> AppendResult:
        return append_messages(
            self.host, self.imap_port, self.user, self.password, messages, flags=flags, mailbox=mailbox
        )

    def observer(self, mailbox: str = "INBOX") -> ImapObserver:
        obs = ImapObserver(self.host, self.imap_port, self.user, self.password, mailbox)
        self._closers.append(obs.close)
        return obs

    def close(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()
