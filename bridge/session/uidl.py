"""What a POP3 client sees of the upstream maildrop: numbered messages with sizes and UIDLs."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from typing import overload

from bridge.imap import MailboxSnapshot
from bridge.pop3 import Maildrop, MessageList
from bridge.uidl.serving import SessionUidls


def unique_id(uidvalidity: int, uid: int) -> str:
    """UIDL for a message: Dovecot's default pop3_uidl_format (%08Xu%08Xv), so mailboxes that
    move from Dovecot's own POP3 to the bridge keep their UIDLs and devices don't re-download.
    16 characters of 0-9a-f: within RFC 1939's 0x21-0x7E, 70-character rule."""
    return f"{uid:08x}{uidvalidity:08x}"


class _UniqueIds(Sequence[str]):
    """The UIDLs of a snapshot, each made when asked for: 200,000 of them kept as strings
    would take about 14 MB, and sessions mostly want a handful (RETR, DELE) or all of them
    once, for the UIDL lines the message list keeps."""

    def __init__(self, uidvalidity: int, uids: Sequence[int]) -> None:
        self._suffix = f"{uidvalidity:08x}"
        self._uids = uids

    def __len__(self) -> int:
        return len(self._uids)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [f"{uid:08x}{self._suffix}" for uid in self._uids[index]]
        return f"{self._uids[index]:08x}{self._suffix}"

    def __iter__(self) -> Iterator[str]:
        suffix = self._suffix
        return (f"{uid:08x}{suffix}" for uid in self._uids)


def _message_list(snapshot: MailboxSnapshot) -> MessageList:
    # The ids are made here from distinct UIDs (a snapshot's are strictly ascending) in a
    # 16-hex-digit form RFC 1939 allows: nothing to check again.
    ids = _UniqueIds(snapshot.uidvalidity, snapshot.uids)
    return MessageList(snapshot.sizes, ids, array("q", snapshot.uids), checked=True)


def maildrop_from_snapshot(snapshot: MailboxSnapshot, uidls: SessionUidls | None = None) -> Maildrop:
    """The session's maildrop. With the defaults (`uidls` None) its message list is worked
    out once per snapshot: the engine hands every session the same snapshot while the mailbox
    stays unchanged. Any other `[uidl]` settings: bridge.uidl.serving (memoised there)."""
    if uidls is None:
        return Maildrop(snapshot.derived(_message_list))
    return Maildrop(uidls.message_list(snapshot))
