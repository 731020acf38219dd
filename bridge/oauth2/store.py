"""Where enrolled accounts live (`oauth2.store`): a directory (`file:/path`) or Redis
(`redis://...`, for several bridge hosts; `bridge.oauth2.redis_store`).

Both keep one record per account (bridge.oauth2.records) under its account_key and give a
lock per account that holds across every process sharing the store, so one refresh runs at a
time whichever bridge host or worker asks (under strict refresh-token rotation a second,
concurrent refresh would be refused with invalid_grant and lose the account). The commands
of `pop3-imap-bridge oauth2` write the same store, so a running bridge sees an enrolment, a
new device password or a removal at the account's next login.

The file store writes atomically (a temporary file, fsync, rename, fsync of the directory):
a crash leaves the old record or the new one, never half of one. Its lock is an fcntl lock
on a file beside the record, which the kernel releases when its holder dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import trio

from bridge.config import account_key
from bridge.oauth2.errors import StoreUnavailable
from bridge.ops.logs import get_logger

# Lock waits poll (a blocking flock or Redis wait in a worker thread could not be cancelled).
_LOCK_POLL_SECONDS = (0.005, 0.2)
_SUFFIX = ".json"
_T = TypeVar("_T")
_log = get_logger(component="oauth2")


class StoreLockTimeout(StoreUnavailable):
    """Another process held the account's lock for longer than the wait allowed."""


class TokenStore(Protocol):
    async def load(self, account: str) -> bytes | None:
        """The account's record, or None if it is not enrolled."""
        ...

    async def save(self, account: str, data: bytes) -> None:
        """Replace the account's record, atomically."""
        ...

    async def delete(self, account: str) -> bool:
        """Remove the account's record; False if there was none."""
        ...

    async def accounts(self) -> list[bytes]:
        """Every record in the store."""
        ...

    def lock(self, account: str, wait_seconds: float) -> AbstractAsyncContextManager[None]:
        """Hold the account's lock (across every process sharing the store) for the block;
        StoreLockTimeout after `wait_seconds` without it."""
        ...

    def close(self) -> None: ...


async def poll_lock(try_once: Callable[[], bool], wait_seconds: float, account: str) -> None:
    """Call `try_once()` (a worker-thread call returning True once the lock is taken) with
    growing pauses until it succeeds or `wait_seconds` have passed."""
    deadline = trio.current_time() + wait_seconds
    pause = _LOCK_POLL_SECONDS[0]
    if await trio.to_thread.run_sync(try_once):
        return
    _log.debug("oauth2_store_lock_busy", account=account)
    while not await trio.to_thread.run_sync(try_once):
        if trio.current_time() + pause > deadline:
            raise StoreLockTimeout(f"token store: the account's lock stayed taken for {wait_seconds:g} s")
        await trio.sleep(pause)
        pause = min(pause * 2, _LOCK_POLL_SECONDS[1])


class FileStore:
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _path(self, account: str, suffix: str = _SUFFIX) -> Path:
        # Percent-encoded: any account name is one file name inside the directory.
        return self.directory / (quote(account_key(account), safe="@+-_") + suffix)

    async def load(self, account: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self._path(account).read_bytes()
            except FileNotFoundError:
                return None

        return await _io("read", read)

    async def save(self, account: str, data: bytes) -> None:
        await _io("write", self._write, self._path(account), data)

    def _write(self, path: Path, data: bytes) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=_SUFFIX)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    async def delete(self, account: str) -> bool:
        def remove() -> bool:
            try:
                self._path(account).unlink()
            except FileNotFoundError:
                return False
            return True

        return await _io("delete", remove)

    async def accounts(self) -> list[bytes]:
        def read_all() -> list[bytes]:
            if not self.directory.is_dir():
                return []
            found = []
            for path in sorted(self.directory.glob("*" + _SUFFIX)):
                if not path.name.startswith(".tmp-"):
                    with contextlib.suppress(FileNotFoundError):
                        found.append(path.read_bytes())
            return found

        return await _io("list", read_all)

    @asynccontextmanager
    async def lock(self, account: str, wait_seconds: float) -> AsyncIterator[None]:
        path = self._path(account, ".lock")

        def open_lock_file() -> int:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

        descriptor = await _io("lock", open_lock_file)

        def try_once() -> bool:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            return True

        try:
            try:
                await poll_lock(try_once, wait_seconds, account)
            except OSError as exc:
                raise StoreUnavailable(f"token store: cannot lock {path}: {exc.strerror}") from None
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def close(self) -> None:
        pass


async def _io(what: str, function: Callable[..., _T], *args: Any) -> _T:
    try:
        return await trio.to_thread.run_sync(function, *args)
    except OSError as exc:
        raise StoreUnavailable(f"token store: {what} failed: {exc.strerror or type(exc).__name__}") from None
