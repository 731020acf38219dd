"""At most one POP3 session per maildrop in this process (RFC 1939 exclusive-access lock)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class MaildropInUse(Exception):
    pass


class MaildropLocks:
    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock for `key` for the block's duration; MaildropInUse if already held."""
        if key in self._held:
            raise MaildropInUse(key)
        self._held.add(key)
        try:
            yield
        finally:
            self._held.discard(key)

    def __len__(self) -> int:
        return len(self._held)
