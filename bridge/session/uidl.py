"""What a POP3 client sees of the upstream maildrop: numbered messages with sizes and UIDLs."""

from __future__ import annotations

from bridge.imap import MailboxSnapshot
from bridge.pop3 import Maildrop, MessageList
from bridge.uidl.serving import SessionUidls


def unique_id(uidvalidity: int, uid: int) -> str:
    """UIDL for a message: Dovecot's default pop3_uidl_format (%08Xu%08Xv), so mailboxes that
    move from Dovecot's own POP3 to the bridge keep their UIDLs and devices don't re-download.
    16 characters of 0-9a-f: within RFC 1939's 0x21-0x7E, 70-character rule."""
    return f"{uid:08x}{uidvalidity:08x}"


def _message_list(snapshot: MailboxSnapshot) -> MessageList:
    uidvalidity = snapshot.uidvalidity
    return MessageList(snapshot.sizes, [unique_id(uidvalidity, uid) for uid in snapshot.uids], snapshot.uids)


def maildrop_from_snapshot(snapshot: MailboxSnapshot, uidls: SessionUidls | None = None) -> Maildrop:
    """The session's maildrop. With the defaults (`uidls` None) its message list is worked
    out once per snapshot: the engine hands every session the same snapshot while the mailbox
    stays unchanged. Any other `[uidl]` settings: bridge.uidl.serving (memoised there)."""
    if uidls is None:
        return Maildrop(snapshot.derived(_message_list))
    return Maildrop(uidls.message_list(snapshot))
