"""The upstream IMAP side.

`bridge.imap.mailbox.ImapMailbox` is the mailbox the POP3 side works with (the operations,
written once); below it an engine's channel (`trio_engine`, the default, or
`aioimaplib_engine`, chosen by `engines`) frames commands and reads answers with the sans-IO
`wire` and `untagged` modules; `pool` parks logged-in connections between sessions. This
package's namespace offers what the rest of the bridge needs to know of it.
"""

from bridge.imap.errors import (
    AuthenticationFailed,
    MessageGone,
    PreauthGreeting,
    UpstreamError,
    UpstreamImplausible,
    UpstreamNotListening,
    UpstreamUnavailable,
)
from bridge.imap.interface import ChunkedRangeReader, MaildropStore, RangeReader
from bridge.imap.snapshot import MailboxSnapshot, MessageInfo

__all__ = [
    "AuthenticationFailed",
    "ChunkedRangeReader",
    "MailboxSnapshot",
    "MaildropStore",
    "MessageGone",
    "MessageInfo",
    "PreauthGreeting",
    "RangeReader",
    "UpstreamError",
    "UpstreamImplausible",
    "UpstreamNotListening",
    "UpstreamUnavailable",
]
