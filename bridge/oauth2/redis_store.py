"""The token store in Redis (`oauth2.store = "redis://host:6379/0"`), for several bridge hosts.

redis-py's blocking client, each call in a worker thread (its asyncio client does not run on
Trio; the pool of connections it keeps is thread-safe). A record is one key; the lock per
account is redis-py's `Lock`: `SET key token NX PX`, released only by its holder (a
compare-and-delete script), and expiring by itself if the holder dies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis
import trio

from bridge.config import account_key
from bridge.oauth2.errors import StoreUnavailable
from bridge.oauth2.store import poll_lock

_T = TypeVar("_T")
_PREFIX = "pop3-imap-bridge:oauth2:"
# A dead holder's lock expires after this long; a live one is released at once.
_LOCK_EXPIRY_MINIMUM_SECONDS = 30.0


class RedisStore:
    def __init__(self, url: str, timeout_seconds: float) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds)
        self._lock_expiry = max(_LOCK_EXPIRY_MINIMUM_SECONDS, 2 * timeout_seconds)

    @staticmethod
    def _key(account: str) -> str:
        return f"{_PREFIX}account:{account_key(account)}"

    async def _call(self, what: str, function: Callable[..., _T], *args: Any) -> _T:
        try:
            return await trio.to_thread.run_sync(function, *args)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"token store: redis {what} failed: {type(exc).__name__}") from None

    async def load(self, account: str) -> bytes | None:
        value = await self._call("read", self._client.get, self._key(account))
        return None if value is None else bytes(value)

    async def save(self, account: str, data: bytes) -> None:
        await self._call("write", self._client.set, self._key(account), data)

    async def delete(self, account: str) -> bool:
        return bool(await self._call("delete", self._client.delete, self._key(account)))

    async def accounts(self) -> list[bytes]:
        def read_all() -> list[bytes]:
            keys = sorted(self._client.scan_iter(match=f"{_PREFIX}account:*", count=500))
            values = self._client.mget(keys) if keys else []
            return [bytes(value) for value in values if value is not None]

        return await self._call("list", read_all)

    @asynccontextmanager
    async def lock(self, account: str, wait_seconds: float) -> AsyncIterator[None]:
        # thread_local=False: the worker thread that releases is not the one that acquired.
        lock = self._client.lock(
            f"{_PREFIX}lock:{account_key(account)}", timeout=self._lock_expiry, blocking=False, thread_local=False
        )
        try:
            await poll_lock(lock.acquire, wait_seconds, account)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"token store: redis lock failed: {type(exc).__name__}") from None
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(lock.release)
                except redis.RedisError:
                    pass  # it expires by itself (LockNotOwnedError: it already did)

    def close(self) -> None:
        self._client.close()
