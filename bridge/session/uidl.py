"""What a POP3 client sees of the upstream maildrop: numbered messages with sizes and UIDLs."""

from __future__ import annotations

from bridge.imap import MailboxSnapshot
from bridge.pop3 import Maildrop, MessageList


def unique_id(uidvalidity: int, uid: int) -> str:
    """UIDL for a message: Dovecot's default pop3_uidl_format (%08Xu%08Xv), so mailboxes that
    move from Dovecot's own POP3 to the bridge keep their UIDLs and devices don't re-download.
    16 characters of 0-9a-f: within RFC 1939's 0x21-0x7E, 70-character rule."""
    return f"{uid:08x}{uidvalidity:08x}"


def _message_list(snapshot: MailboxSnapshot) -> MessageList:
    uidvalidity = snapshot.uidvalidity
    return MessageList(snapshot.sizes, [unique_id(uidvalidity, uid) for uid in snapshot.uids], snapshot.uids)


def maildrop_from_snapshot(snapshot: MailboxSnapshot) -> Maildrop:
    """The session's maildrop. Its message list is worked out once per snapshot: the engine
    hands every session the same snapshot while the mailbox stays unchanged."""
    return Maildrop(snapshot.derived(_message_list))
