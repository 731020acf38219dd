"""Seeding the store's maildirs without IMAP, for the rows that need thousands of accounts or
hundreds of thousands of messages.

- `write_accounts`: users whose messages are written straight into Maildir/new, as a local
  delivery agent would; Dovecot assigns their UIDs and indexes them when the mailbox is first
  opened (by whichever server opens it first, inside that server's first session).
- `clone_account`: a new user whose maildir is a copy of another's, index files included,
  the message files hard links: the state Dovecot leaves after APPENDs, reproduced in about
  a second instead of a minute for 200,000 messages. Safe because Dovecot never rewrites a
  maildir message file (a flag change renames the link, an expunge unlinks it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox import DovecotSandbox

_SUBDIRS = ("cur", "new", "tmp")


@dataclass(frozen=True)
class SeededAccount:
    user: str
    password: str
    # The maildir base name of each message, in the order given.
    files: tuple[str, ...]


def _chown(store: DovecotSandbox, path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, store.mail_uid, store.mail_gid)


def _make_maildir(store: DovecotSandbox, user: str) -> Path:
    maildir = store.maildir_path(user)
    maildir.mkdir(mode=0o700)
    _chown(store, maildir)
    for sub in _SUBDIRS:
        (maildir / sub).mkdir(mode=0o700)
        _chown(store, maildir / sub)
    return maildir


def _base_name(serial: int, size: int) -> str:
    # <time>.M<unique>P<pid>.<host>,S=<size>,W=<virtual size>: the sizes in the name spare
    # Dovecot a stat (and, for W, reading the file); messages here are CRLF, so W = S.
    return f"{int(time.time())}.M{serial}P{os.getpid()}.bench,S={size},W={size}"


_serial = iter(range(1, 1 << 62))


def write_accounts(
    store: DovecotSandbox,
    count: int,
    messages: Callable[[int], Sequence[bytes | Path]],
    progress: Callable[[str], None] | None = None,
) -> list[SeededAccount]:
    """`count` new users on `store`; user i gets `messages(i)`: bytes written as a file, or
    a Path (a file of CRLF lines on the same file system) hard-linked in."""
    accounts = []
    for index in range(count):
        user = f"s{index:06d}x{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        store.add_user(user, password)
        new = _make_maildir(store, user) / "new"
        names = []
        for message in messages(index):
            if isinstance(message, Path):
                name = _base_name(next(_serial), message.stat().st_size)
                os.link(message, new / name)
            else:
                name = _base_name(next(_serial), len(message))
                path = new / name
                path.write_bytes(message)
                path.chmod(0o600)
                _chown(store, path)
            names.append(name)
        accounts.append(SeededAccount(user, password, tuple(names)))
        if progress and (index + 1) % 2000 == 0:
            progress(f"{index + 1:,}/{count:,} accounts written")
    return accounts


def message_file(store: DovecotSandbox, name: str, data: bytes) -> Path:
    """`data` as a file owned by the mail user next to the homes, for `write_accounts` to
    hard-link into many maildirs."""
    path = store.workdir / "home" / name
    path.write_bytes(data)
    path.chmod(0o600)
    _chown(store, path)
    return path


def clone_account(store: DovecotSandbox, source_user: str) -> tuple[str, str]:
    """A new user holding a copy of `source_user`'s maildir (see the module docstring).
    The source must not be in use while it is copied. Returns (user, password)."""
    box = store.new_mailbox()
    source = store.maildir_path(source_user)
    target = store.maildir_path(box.user)
    for directory, _subdirs, files in os.walk(source):
        here = Path(directory)
        there = target / here.relative_to(source)
        there.mkdir(mode=0o700, exist_ok=True)
        _chown(store, there)
        link = here.name in ("cur", "new") and here.parent == source
        for name in files:
            if link:
                os.link(here / name, there / name)
            else:
                shutil.copy2(here / name, there / name)
                _chown(store, there / name)
    return box.user, box.password


def remaining_files(store: DovecotSandbox, user: str) -> set[str]:
    """Base names of the message files in `user`'s maildir now (flags stripped): what the
    store still holds, whatever moved a file from new/ to cur/ or changed its flags."""
    maildir = store.maildir_path(user)
    names = set()
    for sub in ("cur", "new"):
        for entry in os.scandir(maildir / sub):
            names.add(entry.name.split(":", 1)[0])
    return names
