"""The sessions of this process, for the admin API (`admin who`, `admin kick`).

Every session registers itself when it starts and unregisters when it ends
(bridge.session.conversation); what it records is what `who` shows: account, device, client
address, back end, since when, state, bytes sent. `kick` ends sessions the way a dropped
connection does, so their pending deletions are never applied; a session already in its QUIT
(state "update") is left to finish it, as it ends by itself a moment later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from bridge.config import account_key


@dataclass(eq=False)
class SessionRecord:
    session: str
    client: str  # the real client's address:port (behind PROXY, the one its header named)
    tls: bool
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    state: str = "authorization"  # then "transaction", "update" during QUIT
    user: str | None = None
    account: str | None = None
    device: str | None = None
    backend: str | None = None
    bytes_sent: int = 0
    kicked: bool = False
    # Ends the session (its cancel scope); set by the session.
    end: Callable[[], None] = field(default=lambda: None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "session": self.session, "account": self.account, "device": self.device, "user": self.user,
            "client": self.client, "backend": self.backend, "since": self.since.isoformat(timespec="seconds"),
            "state": self.state, "bytes_sent": self.bytes_sent, "tls": self.tls,
        }


class SessionRegistry:
    def __init__(self) -> None:
        self._records: dict[int, SessionRecord] = {}

    def register(self, record: SessionRecord) -> None:
        self._records[id(record)] = record

    def unregister(self, record: SessionRecord) -> None:
        self._records.pop(id(record), None)

    def __len__(self) -> int:
        return len(self._records)

    def matching(self, account_glob: str | None = None) -> list[SessionRecord]:
        """Every session, or those of accounts matching the glob (case-insensitively, as
        accounts are compared); sessions not logged in yet have no account."""
        records = sorted(self._records.values(), key=lambda record: record.since)
        if account_glob is None:
            return records
        pattern = account_key(account_glob)
        return [r for r in records if r.account is not None and fnmatchcase(account_key(r.account), pattern)]

    def kick(self, account: str, device: str | None = None) -> list[SessionRecord]:
        """End the sessions of `account` (of one `device`), without their deletions."""
        key = account_key(account)
        kicked = []
        for record in list(self._records.values()):
            if record.account is None or account_key(record.account) != key:
                continue
            if device is not None and record.device != device:
                continue
            kicked.append(record)
            if record.state != "update" and not record.kicked:
                record.kicked = True
                record.end()
        return kicked
