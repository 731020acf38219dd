"""Reading and writing UIDL records (bridge.uidl.records) in the state folder.

Writing never leaves a reader without a complete picture: a new table version is appended in
full before the versions it replaces are expunged (a reader that sees both takes the newest
complete one), facts are only ever added (and merged records appended before the ones they
merge are expunged), and only records this store read are expunged, never one another
writer added meanwhile. Anything in the folder may be planted, so every record is checked
(records.read_record) and one that fails is logged and left where it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from bridge.imap.errors import UpstreamError
from bridge.imap.syntax import quote_string
from bridge.ops.logs import get_logger
from bridge.uidl.records import (
    RECORD_HEADER,
    Fact,
    Record,
    RecordIgnored,
    RecordSigner,
    read_record,
    render_facts,
    render_table,
)

_log = get_logger(component="uidl")
# Records fetched per round trip (at most 64 KiB each).
_FETCH_BATCH = 64
_MAX_IGNORED_WARNINGS = 10


class UidlBackend(Protocol):
    """What the store needs from an upstream connection (bridge.imap.mailbox.ImapMailbox)."""

    async def ensure_folder(self, folder: str) -> None: ...
    async def folder_status(self, folder: str) -> tuple[int, int, int] | None: ...
    async def append(self, folder: str, message: bytes) -> tuple[int, int] | None: ...
    async def search(self, folder: str, *criteria: str) -> list[int]: ...
    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]: ...
    async def delete_in(self, folder: str, uids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class FolderStamp:
    """The state folder's STATUS: it changed if any of these did."""

    uidvalidity: int
    uidnext: int
    messages: int

    def after_append(self, appended: tuple[int, int] | None) -> FolderStamp | None:
        """The stamp after our own APPEND, if the server's APPENDUID shows that nobody else
        wrote in between; None if that cannot be told."""
        if appended is None or appended != (self.uidvalidity, self.uidnext):
            return None
        return FolderStamp(self.uidvalidity, self.uidnext + 1, self.messages + 1)


@dataclass(frozen=True)
class Stored:
    """A record as read, with its UID in the state folder."""

    state_uid: int
    record: Record


class UidlStore:
    def __init__(self, backend: UidlBackend, folder: str, mailbox: str, signer: RecordSigner) -> None:
        self._backend = backend
        self.folder = folder
        self.mailbox = mailbox
        self._signer = signer

    async def stamp(self) -> FolderStamp | None:
        """The state folder's stamp, or None if the folder does not exist (no records)."""
        status = await self._backend.folder_status(self.folder)
        return FolderStamp(*status) if status is not None else None

    async def record_uids(self) -> list[int]:
        """UIDs of the UIDL records in the state folder (of every maildrop and kind). Versions
        flagged \\Deleted are superseded (a server without UIDPLUS keeps them)."""
        return await self._backend.search(self.folder, "UNDELETED", "HEADER", RECORD_HEADER, quote_string(""))

    async def fetch(self, state_uids: Sequence[int]) -> list[Stored]:
        """The trusted records of this maildrop among `state_uids`; the others are ignored
        (logged when they could not be trusted, silently when they are another maildrop's)."""
        found: list[Stored] = []
        ignored: list[tuple[int, str]] = []
        for start in range(0, len(state_uids), _FETCH_BATCH):
            batch = state_uids[start : start + _FETCH_BATCH]
            texts = await self._backend.fetch_texts(self.folder, batch)
            for uid in batch:
                text = texts.get(uid)
                if text is None:
                    continue  # replaced by another writer since the search: its successor is read
                try:
                    record = read_record(text, self._signer)
                except RecordIgnored as exc:
                    ignored.append((uid, exc.reason))
                    continue
                if record.mailbox == self.mailbox:
                    found.append(Stored(uid, record))
        for uid, reason in ignored[:_MAX_IGNORED_WARNINGS]:
            _log.warning("uidl_record_ignored", reason=reason, state_uid=uid)
        if len(ignored) > _MAX_IGNORED_WARNINGS:
            _log.warning("uidl_record_ignored_more", count=len(ignored) - _MAX_IGNORED_WARNINGS)
        return found

    async def _append_all(self, messages: list[bytes]) -> list[tuple[int, int] | None]:
        await self._backend.ensure_folder(self.folder)
        return [await self._backend.append(self.folder, message) for message in messages]

    async def write_table(
        self, uidvalidity: int, entries: Sequence[tuple[int, str, int | None]], origin: str,
        replaces: Sequence[int] = (), from_uidvalidity: int | None = None,
    ) -> list[tuple[int, int] | None]:
        """A new version of the maildrop's UIDL table for `uidvalidity`, then the records it
        `replaces` (their state UIDs) expunged."""
        now = datetime.now(UTC)
        try:
            messages = render_table(self._signer, self.mailbox, uidvalidity, entries, origin, now, from_uidvalidity)
        except ValueError as exc:
            raise UpstreamError(f"UIDL table cannot be saved: {exc}") from None
        appended = await self._append_all(messages)
        await self.delete(replaces)
        _log.debug("uidl_table_saved", entries=len(entries), records=len(messages), origin=origin)
        return appended

    async def write_facts(self, uidvalidity: int, facts: Sequence[Fact], through: int) -> tuple[int, int] | None:
        """One record of facts of the maildrop (`through`: every message up to that UID was
        looked at; records.split_facts says how many facts fit); its APPENDUID."""
        try:
            message = render_facts(self._signer, self.mailbox, uidvalidity, facts, through, datetime.now(UTC))
        except ValueError as exc:
            raise UpstreamError(f"UIDL facts cannot be saved: {exc}") from None
        return (await self._append_all([message]))[0]

    async def delete(self, state_uids: Sequence[int]) -> None:
        if state_uids:
            await self._backend.delete_in(self.folder, state_uids)
