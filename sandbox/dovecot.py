"""A private, unprivileged Dovecot (IMAP + POP3) on loopback, for tests and demos.

Debian's Dovecot binaries are driven by a configuration written from scratch into a
working directory, so nothing under /etc, /run or /var/lib is read or touched and a
system Dovecot (if one runs) is irrelevant. Dovecot's own POP3 service serves the
same maildirs as its IMAP service, which makes it the reference the bridge's POP3
output is compared against.

The IMAP and POP3 services come from the Debian packages dovecot-imapd and
dovecot-pop3d when installed, else from copies that scripts/install-deps unpacks
into UNPACKED_PACKAGES_DIR (those packages conflict with other IMAP/POP3 servers).
"""

from __future__ import annotations

import contextlib
import grp
import os
import poplib
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from sandbox.netcheck import LOOPBACK, greets, pick_free_ports, port_closed
from sandbox.seeding import AppendResult, ImapObserver, append_messages

__all__ = [
    "DovecotError",
    "DovecotNotInstalledError",
    "DovecotSandbox",
    "DovecotStartError",
    "Mailbox",
    "check_installation",
]


# Debian puts dovecot in /usr/sbin, which is not on an ordinary user's PATH.
_EXTRA_BIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_DEBIAN_PACKAGES = "dovecot-core dovecot-imapd dovecot-pop3d"
_PROTOCOL_PACKAGES = {"imap": "dovecot-imapd", "pop3": "dovecot-pop3d"}

# Debian's dovecot-imapd / dovecot-pop3d conflict with every other IMAP / POP3
# server package (e.g. cyrus-imapd), so scripts/install-deps unpacks them here
# (<dir>/<package>/usr/lib/dovecot/...) unless they are installed as packages.
UNPACKED_PACKAGES_DIR = Path("/usr/local/lib/pop3-imap-bridge")

# Characters that would need quoting or trigger %-variable / $-setting expansion
# somewhere in dovecot.conf or in passwd-file "args"; refusing them is simpler and
# safer than trying to escape for every context.
_UNSAFE_PATH_CHARS = re.compile(r"[\s\"'%$\\{}#<>]")
_USERNAME_RE = re.compile(r"[A-Za-z0-9._@+-]{1,64}")

# AF_UNIX paths are limited to 107 bytes plus NUL, and Dovecot creates sockets
# as deep as <base_dir>/token-login/imap-urlauth (measured: 82 works, 83 fails).
_MAX_BASE_DIR_LEN = 82


class DovecotError(RuntimeError):
    """The sandbox could not do what was asked; the message says why."""


class DovecotNotInstalledError(DovecotError):
    """A Dovecot binary is missing on this machine."""


class DovecotStartError(DovecotError):
    """Dovecot did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class _RunAs:
    user: str
    group: str
    uid: int
    gid: int


def _find_binary(name: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS])
    found = shutil.which(name, path=search)
    if found is None:
        raise DovecotNotInstalledError(
            f"'{name}' not found (searched PATH and {', '.join(_EXTRA_BIN_DIRS)}). "
            f"Install the Debian packages {_DEBIAN_PACKAGES} (scripts/install-deps does it)."
        )
    return found


def _libexec_dir(doveconf: str) -> Path:
    """Where the installed Dovecot keeps its service executables."""
    # An empty config yields the compiled-in default, so /etc/dovecot is not read.
    result = subprocess.run(
        [doveconf, "-c", os.devnull, "-h", "libexec_dir"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise DovecotError(f"doveconf failed:\n{result.stderr.strip()}")
    return Path(result.stdout.strip())


def _protocol_executables(doveconf: str, protocols: Sequence[str]) -> dict[str, Path]:
    """Executables to name in the configuration, by service: none for a protocol whose
    Debian package is installed (Dovecot finds them in its libexec_dir), every one of the
    package for a protocol that install-deps unpacked instead. Dovecot checks the executable
    of each service a protocol brings, not only the protocol's own and its login service
    (imap also has imap-urlauth, imap-urlauth-login, imap-urlauth-worker, imap-hibernate)."""
    libexec = _libexec_dir(doveconf)
    found: dict[str, Path] = {}
    for proto in protocols:
        package = _PROTOCOL_PACKAGES[proto]
        unpacked = UNPACKED_PACKAGES_DIR / package / "usr/lib/dovecot"
        if (libexec / proto).is_file() and (libexec / f"{proto}-login").is_file():
            continue
        if not ((unpacked / proto).is_file() and (unpacked / f"{proto}-login").is_file()):
            raise DovecotNotInstalledError(
                f"Dovecot's {proto} service is missing (looked in {libexec} and {unpacked}); "
                f"run scripts/install-deps, or install the Debian package {package}"
            )
        for path in sorted(unpacked.iterdir()):
            if path.is_file() and os.access(path, os.X_OK):
                found[path.name] = path
    return found


def check_installation(*, pop3: bool = True) -> None:
    """Raise :class:`DovecotNotInstalledError` unless every Dovecot piece is present."""
    _find_binary("dovecot")
    _find_binary("doveadm")
    _protocol_executables(_find_binary("doveconf"), ("imap", "pop3") if pop3 else ("imap",))


def _resolve_run_as(unprivileged_user: str) -> _RunAs:
    if os.geteuid() == 0:
        # Dovecot refuses to run mail processes as uid 0, so as root every
        # process that can drop privileges runs as this user instead.
        try:
            pw = pwd.getpwnam(unprivileged_user)
        except KeyError:
            raise DovecotError(f"user {unprivileged_user!r} does not exist") from None
        if pw.pw_uid == 0:
            raise DovecotError(f"user {unprivileged_user!r} has uid 0; Dovecot refuses it")
    else:
        # Without root Dovecot cannot switch users, so every setting that names a
        # user must name ourselves.
        try:
            pw = pwd.getpwuid(os.getuid())
        except KeyError:
            raise DovecotError(
                f"uid {os.getuid()} has no passwd entry; Dovecot needs a user name for it"
            ) from None
    try:
        group = grp.getgrgid(pw.pw_gid).gr_name
    except KeyError:
        raise DovecotError(f"gid {pw.pw_gid} has no group entry") from None
    return _RunAs(user=pw.pw_name, group=group, uid=pw.pw_uid, gid=pw.pw_gid)


def _check_traversable(path: Path, run_as: _RunAs) -> None:
    # Mail processes run as run_as and must reach the home directories, which
    # fails silently (as "mailbox doesn't exist"-style errors) when some parent is
    # private to root, e.g. pytest's /tmp/pytest-of-root (mode 0700).
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == run_as.uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == run_as.gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            raise DovecotError(
                f"{parent} is not traversable by {run_as.user}, which Dovecot's mail "
                f"processes run as; use a workdir whose parents are world-executable "
                f"(e.g. tempfile.mkdtemp() itself: the sandbox opens up its own workdir)"
            )


class DovecotSandbox:
    """A Dovecot instance living entirely inside ``workdir``.

    Use as a context manager (starts on enter, stops on exit) or call
    :meth:`start` / :meth:`stop` directly; it can be restarted and keeps its ports.

    When run as root, Dovecot's unprivileged processes and the mail files belong to
    ``unprivileged_user`` (default ``nobody``); otherwise everything runs as the
    current user. Only loopback is listened on.
    """

    host: str = LOOPBACK

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        imap_port: int | None = None,
        pop3_port: int | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        extra_config: str = "",
        startup_timeout: float = 20.0,
        unprivileged_user: str = "nobody",
        pop3: bool = True,
    ) -> None:
        self._dovecot_bin = _find_binary("dovecot")
        self._doveadm_bin = _find_binary("doveadm")
        self._doveconf_bin = _find_binary("doveconf")
        # Dovecot's own POP3 (the tests' reference server); the demo needs IMAP only.
        self._protocols = ("imap", "pop3") if pop3 else ("imap",)
        self._executables = _protocol_executables(self._doveconf_bin, self._protocols)

        self._workdir = Path(workdir).resolve()
        if _UNSAFE_PATH_CHARS.search(str(self._workdir)):
            raise DovecotError(
                f"workdir {self._workdir} contains characters Dovecot's config cannot "
                f"take unquoted (whitespace, quotes, % $ \\ {{ }} # < >)"
            )
        if len(str(self._workdir / "run")) > _MAX_BASE_DIR_LEN:
            raise DovecotError(
                f"workdir {self._workdir} is too long: Dovecot's unix sockets below it "
                f"would exceed the 108-byte AF_UNIX limit; use a shorter path"
            )
        if (tls_cert is None) != (tls_key is None):
            raise DovecotError("tls_cert and tls_key must be given together")
        self._tls_cert = Path(tls_cert).resolve() if tls_cert is not None else None
        self._tls_key = Path(tls_key).resolve() if tls_key is not None else None
        for tls_path in (self._tls_cert, self._tls_key):
            if tls_path is not None and _UNSAFE_PATH_CHARS.search(str(tls_path)):
                raise DovecotError(f"TLS file path {tls_path} has characters Dovecot cannot take")

        self._run_as = _resolve_run_as(unprivileged_user)
        self._extra_config = extra_config
        self._startup_timeout = startup_timeout

        # Ports chosen by us may be re-picked if another program grabs one before
        # Dovecot binds it; ports the caller asked for are never changed.
        self._ports_pinned = imap_port is not None or pop3_port is not None
        self._imap_port = imap_port or 0
        self._pop3_port = pop3_port or 0
        self._imaps_port: int | None = None
        self._pop3s_port: int | None = None
        self._assign_ports()

        self._proc: subprocess.Popen[bytes] | None = None
        self._serving = False
        self._started_once = False
        self._users: dict[str, str] = {}
        self._prepare_workdir()

    # -- public properties -------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def config_path(self) -> Path:
        return self._workdir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir / "dovecot.log"

    @property
    def imap_port(self) -> int:
        return self._imap_port

    @property
    def pop3_port(self) -> int:
        return self._pop3_port

    @property
    def imaps_port(self) -> int | None:
        """Implicit-TLS IMAP port, or None when the sandbox runs without TLS."""
        return self._imaps_port

    @property
    def pop3s_port(self) -> int | None:
        """Implicit-TLS POP3 port, or None when the sandbox runs without TLS."""
        return self._pop3s_port

    @property
    def tls_enabled(self) -> bool:
        return self._tls_cert is not None

    @property
    def pid(self) -> int | None:
        """Pid of the Dovecot master process while it runs, else None."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        return None

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def mail_uid(self) -> int:
        return self._run_as.uid

    @property
    def mail_gid(self) -> int:
        return self._run_as.gid

    @property
    def users(self) -> dict[str, str]:
        """Users added so far, name -> password (a copy)."""
        return dict(self._users)

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> DovecotSandbox:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Dovecot and return once both IMAP and POP3 greet."""
        if self.running:
            return
        attempts = 1 if (self._ports_pinned or self._started_once) else 3
        for attempt in range(attempts):
            try:
                self._start_once()
            except DovecotStartError as exc:
                if attempt + 1 < attempts and "Address already in use" in str(exc):
                    self._imap_port = self._pop3_port = 0
                    self._assign_ports()
                    continue
                raise
            self._started_once = True
            return

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the Dovecot this object started (only that pid); idempotent."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        was_serving, self._serving = self._serving, False
        if proc.poll() is None:
            # SIGTERM makes the master shut down its children (shutdown_clients
            # defaults to yes), so only the master needs signalling.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        # Login processes hold the listening sockets too and may outlive the
        # master briefly; waiting makes an immediate start() on the same ports
        # work. (Not after a failed start: the port may be someone else's.)
        deadline = time.monotonic() + timeout
        while was_serving and time.monotonic() < deadline:
            if all(port_closed(self.host, p) for p in self._listening_ports()):
                break
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    # -- users and mail ---------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Create a user with an empty mailbox; takes effect at once, no restart.

        Each user gets its own passwd-file: Dovecot re-reads a changed passwd-file
        at most once per second, but opens a file it has not seen before right
        away, so a user added in the same second as the previous login still works.
        For the same reason users cannot be re-added with another password.
        """
        if not _USERNAME_RE.fullmatch(name):
            raise ValueError(f"user name {name!r} must match {_USERNAME_RE.pattern}")
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError("password must be non-empty without ':', CR, LF or NUL")
        if name in self._users:
            raise ValueError(f"user {name!r} already exists")
        home = self.home_path(name)
        home.mkdir(mode=0o700)
        self._chown_to_mail_user(home)
        self._write_passwd_file(name, password)
        self._users[name] = password

    def add_master_user(self, name: str, password: str) -> None:
        """A master user (Dovecot's master passdb): logs in as any user, SASL PLAIN with that
        user as the authorization identity. Takes effect at the next login."""
        if not _USERNAME_RE.fullmatch(name):
            raise ValueError(f"user name {name!r} must match {_USERNAME_RE.pattern}")
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError("password must be non-empty without ':', CR, LF or NUL")
        path = self._workdir / "masters"
        lines = [line for line in path.read_text().splitlines() if line and not line.startswith(f"{name}:")]
        lines.append(f"{name}:{{PLAIN}}{password}")
        tmp = self._workdir / ".masters.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o640)
        if os.geteuid() == 0:
            os.chown(tmp, 0, self._run_as.gid)
        # Dovecot re-reads a passwd-file whose mtime (whole seconds) or size changed.
        stamp = max(time.time(), path.stat().st_mtime + 1)
        os.utime(tmp, (stamp, stamp))
        os.replace(tmp, path)

    def set_password(self, name: str, password: str) -> None:
        """Change an existing user's password, as an administrator would upstream.

        Dovecot notices the change at its next login of that user, but re-reads a passwd-file
        at most once per second: for a moment the old password may still work (callers that
        need the new one in force wait for it, e.g. with an IMAP login)."""
        if name not in self._users:
            raise ValueError(f"no user {name!r}")
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError("password must be non-empty without ':', CR, LF or NUL")
        self._write_passwd_file(name, password)
        self._users[name] = password

    def _write_passwd_file(self, name: str, password: str) -> None:
        # passwd-file format: user:password:uid:gid:(gecos):home:(shell):extra
        entry = f"{name}:{{PLAIN}}{password}:{self._run_as.uid}:{self._run_as.gid}::{self.home_path(name)}::\n"
        path = self._users_dir / name
        tmp = self._users_dir / f".{name}.tmp"
        tmp.write_text(entry)
        # The auth process runs as the unprivileged user when we are root.
        tmp.chmod(0o640)
        if os.geteuid() == 0:
            os.chown(tmp, 0, self._run_as.gid)
        if path.exists():
            # Dovecot decides whether to re-read the file by its mtime (whole seconds) and
            # size: a new password of the same length written in the same second as the old
            # one must still look changed.
            stamp = max(time.time(), path.stat().st_mtime + 1)
            os.utime(tmp, (stamp, stamp))
        # Rename, so Dovecot never reads a half-written file.
        os.replace(tmp, path)

    def new_mailbox(self, user: str | None = None, password: str | None = None) -> Mailbox:
        """Add a user (random name and password unless given) and return its mailbox."""
        box = Mailbox(
            self,
            user or f"u{secrets.token_hex(6)}",
            password or secrets.token_urlsafe(12),
        )
        self.add_user(box.user, box.password)
        return box

    def home_path(self, user: str) -> Path:
        # Homes live outside the maildir so Dovecot's per-user state files never
        # show up as mail folders.
        return self._workdir / "home" / user

    def maildir_path(self, user: str) -> Path:
        return self.home_path(user) / "Maildir"

    def doveadm(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``doveadm -c <our config> *args`` (e.g. ``"kick", user``)."""
        cmd = [self._doveadm_bin, "-c", str(self.config_path), *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise DovecotError(
                f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr}{result.stdout}"
            )
        return result

    def sessions(self, user: str) -> int:
        """How many IMAP/POP3 sessions of ``user`` Dovecot currently counts."""
        out = self.doveadm("who", "-1", user).stdout.splitlines()
        return sum(1 for line in out[1:] if line.split(" ", 1)[0] == user)

    def kick(self, user: str, *, timeout: float = 10.0) -> None:
        """Disconnect every IMAP/POP3 session of ``user``; return once they are gone."""
        # doveadm kick exits 68 (EX_NOUSER) when nobody was connected, which is
        # not a failure for callers that just want the user gone.
        result = self.doveadm("kick", user, check=False)
        if result.returncode not in (0, 68):
            raise DovecotError(f"doveadm kick {user} failed:\n{result.stderr}")
        # kick only signals the session processes; waiting until Dovecot no
        # longer counts them means the clients' connections really are closed.
        deadline = time.monotonic() + timeout
        while self.sessions(user):
            if time.monotonic() > deadline:
                raise DovecotError(f"sessions of {user} still alive {timeout} s after kick")
            time.sleep(0.02)

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of Dovecot's log and of its stderr (config errors land there)."""
        parts = []
        for path in (self._stderr_path, self.log_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no log output)"

    # -- internals ---------------------------------------------------------

    @property
    def _users_dir(self) -> Path:
        return self._workdir / "users"

    @property
    def _stderr_path(self) -> Path:
        return self._workdir / "dovecot.stderr"

    def _listening_ports(self) -> Iterator[int]:
        yield self._imap_port
        if "pop3" in self._protocols:
            yield self._pop3_port
        if self._imaps_port is not None:
            yield self._imaps_port
        if self._pop3s_port is not None:
            yield self._pop3s_port

    def _assign_ports(self) -> None:
        wanted = 4 if self.tls_enabled else 2
        free = iter(pick_free_ports(wanted))
        if not self._imap_port:
            self._imap_port = next(free)
        if not self._pop3_port:
            self._pop3_port = next(free)
        if self.tls_enabled:
            self._imaps_port = next(free)
            self._pop3s_port = next(free)

    def _chown_to_mail_user(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _prepare_workdir(self) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # mkdtemp() creates 0700 directories; the mail user must get through.
            self._workdir.chmod(0o755)
            _check_traversable(self._workdir, self._run_as)
        (self._workdir / "home").mkdir(mode=0o755, exist_ok=True)
        (self._workdir / "state").mkdir(mode=0o750, exist_ok=True)
        self._users_dir.mkdir(mode=0o750, exist_ok=True)
        masters = self._workdir / "masters"
        if not masters.exists():
            masters.write_text("")
            masters.chmod(0o640)
        if os.geteuid() == 0:
            os.chown(self._users_dir, 0, self._run_as.gid)
            os.chown(masters, 0, self._run_as.gid)

    def _render_config(self) -> str:
        w = self._workdir
        ra = self._run_as
        if self.tls_enabled:
            tls = f"ssl = yes\nssl_cert = <{self._tls_cert}\nssl_key = <{self._tls_key}\n"
            imaps = f"inet_listener imaps {{\n    address = {LOOPBACK}\n    port = {self._imaps_port}\n  }}"
            pop3s = f"inet_listener pop3s {{\n    address = {LOOPBACK}\n    port = {self._pop3s_port}\n  }}"
        else:
            # With ssl = no Dovecot skips its default imaps/pop3s listeners
            # (993/995), so nothing privileged is bound.
            tls = "ssl = no\n"
            imaps = pop3s = ""
        return f"""\
# Written by sandbox.dovecot; regenerated on every start.
instance_name = sandbox-{os.getpid()}-{self._imap_port}
base_dir = {w}/run
state_dir = {w}/state
log_path = {w}/dovecot.log
log_timestamp = "%Y-%m-%d %H:%M:%S "

protocols = {" ".join(self._protocols)}
listen = {LOOPBACK}

# Every user/group setting names the same account: as root it is the unprivileged
# mail user, otherwise it is us (Dovecot cannot switch users without root).
default_internal_user = {ra.user}
default_internal_group = {ra.group}
default_login_user = {ra.user}
# The default (500) would refuse CI accounts with low uids; 0 stays refused.
first_valid_uid = 1
first_valid_gid = 1

{tls}# Loopback only; clients must be able to LOGIN without TLS.
disable_plaintext_auth = no
# Wrong-password tests would otherwise wait 2 s per failure (the auth penalty,
# disabled at service anvil below, would then slow every later login too).
auth_failure_delay = 0
{self._auth_config()}

mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
}}
# Test mail is disposable; fsync per appended message would dominate seeding time.
mail_fsync = never
# Tests open many sessions for one user from 127.0.0.1; the default of 10 would
# make concurrency tests fail for reasons unrelated to the code under test.
mail_max_userip_connections = 500
default_process_limit = 500
# Dovecot warns at start-up unless auth and anvil can take every login process.
default_client_limit = 2000

{self._service_blocks(imaps, pop3s)}
service anvil {{
  chroot =
  # mode 0 removes the socket, which switches the auth penalty off: after one
  # failed login, logins from 127.0.0.1 would otherwise wait 2 s doubling to 15 s.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service ipc {{
  chroot =
}}
{self._extra_config}
"""

    def _auth_config(self) -> str:
        """The mechanisms and the password database (a subclass may log users in otherwise:
        sandbox.oauth2 adds OAuth2 bearer tokens)."""
        w = self._workdir
        return f"""\
auth_mechanisms = plain login
# Master users (add_master_user): SASL PLAIN as the master with the user as authorization
# identity, or LOGIN "user*master"; `pass = yes` still requires the user to exist.
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  master = yes
  args = scheme=PLAIN {w}/masters
  pass = yes
}}
# One passwd-file per user (see add_user); it also gives uid, gid and home.
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {w}/users/%u
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {w}/users/%u
}}
"""

    def _service_blocks(self, imaps: str, pop3s: str) -> str:
        """The login services' loopback listeners, and the executables of protocols that
        come from an unpacked package (see _protocol_executables)."""
        settings: dict[str, list[str]] = {
            # chroot needs root; an empty value makes the same config work unprivileged.
            "imap-login": ["chroot =", f"inet_listener imap {{\n    address = {LOOPBACK}\n    port = {self._imap_port}\n  }}", imaps],
        }
        if "pop3" in self._protocols:
            settings["pop3-login"] = [
                "chroot =", f"inet_listener pop3 {{\n    address = {LOOPBACK}\n    port = {self._pop3_port}\n  }}", pop3s,
            ]
        for service, path in self._executables.items():
            settings.setdefault(service, []).insert(0, f"executable = {path}")
        return "\n".join(
            f"service {service} {{\n" + "".join(f"  {line}\n" for line in lines if line) + "}"
            for service, lines in settings.items()
        )

    def _start_once(self) -> None:
        self.config_path.write_text(self._render_config())
        with open(self._stderr_path, "wb") as stderr:
            # -F keeps the master in the foreground, so the pid we hold is the
            # master's and stopping never has to guess at pid files.
            self._proc = subprocess.Popen(
                [self._dovecot_bin, "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=self._workdir,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self._serving = True

    def _fatal_reported(self) -> bool:
        # A fatal start-up error must win over a greeting: when another server
        # holds one of our ports, *it* may answer while our Dovecot is dying.
        try:
            return "Fatal:" in self._stderr_path.read_text(errors="replace")
        except OSError:
            return False

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._startup_timeout
        pending = {self._imap_port: b"* OK"}
        if "pop3" in self._protocols:
            pending[self._pop3_port] = b"+OK"
        while True:
            code = self._proc.poll()
            if code is not None or self._fatal_reported():
                status = f"exited with status {code}" if code is not None else "failed"
                raise DovecotStartError(
                    f"dovecot {status} during start-up (config {self.config_path}).\n"
                    f"{self.log_tail()}"
                )
            if not pending:
                return
            for port, prefix in list(pending.items()):
                if greets(self.host, port, prefix, timeout=1.0):
                    del pending[port]
            if pending and time.monotonic() > deadline:
                raise DovecotStartError(
                    f"dovecot did not greet on port(s) {sorted(pending)} within "
                    f"{self._startup_timeout:.0f} s.\n{self.log_tail()}"
                )
            if pending:
                time.sleep(0.02)


@dataclass
class Mailbox:
    """One user's INBOX on a :class:`DovecotSandbox`, with the clients tests need.

    Connections it opens are closed by :meth:`close` (test fixtures call it).
    """

    dovecot: DovecotSandbox
    user: str
    password: str
    _closers: list[Callable[[], object]] = field(default_factory=list, repr=False)

    @property
    def host(self) -> str:
        return self.dovecot.host

    @property
    def imap_port(self) -> int:
        return self.dovecot.imap_port

    @property
    def pop3_port(self) -> int:
        return self.dovecot.pop3_port

    @property
    def maildir(self) -> Path:
        return self.dovecot.maildir_path(self.user)

    def append(
        self, messages: Iterable[bytes], *, flags: Sequence[str] = (), mailbox: str = "INBOX"
    ) -> AppendResult:
        """Store messages over IMAP (pipelined, fast); returns their UIDs in order."""
        return append_messages(
            self.host,
            self.imap_port,
            self.user,
            self.password,
            messages,
            flags=flags,
            mailbox=mailbox,
        )

    def observer(self, mailbox: str = "INBOX") -> ImapObserver:
        """A second, independent IMAP session on this mailbox."""
        obs = ImapObserver(self.host, self.imap_port, self.user, self.password, mailbox)
        self._closers.append(obs.close)
        return obs

    def native_pop3(self, *, login: bool = True, timeout: float = 60.0) -> poplib.POP3:
        """Dovecot's own POP3 on this mailbox: the reference the bridge must match.

        :meth:`close` drops it without QUIT, so nothing gets expunged behind a
        test's back; call ``quit()`` yourself to commit DELEs.
        """
        pop = poplib.POP3(self.host, self.pop3_port, timeout=timeout)
        self._closers.append(pop.close)
        if login:
            pop.user(self.user)
            pop.pass_(self.password)
        return pop

    def close(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()
