"""The upstream IMAP side: a small Trio-facing interface and the engine behind it."""

from bridge.upstream.aioimap import open_mailbox, upstream_runtime
from bridge.upstream.interface import (
    AuthenticationFailed,
    MailboxSnapshot,
    MessageGone,
    MessageInfo,
    UpstreamError,
    UpstreamMailbox,
    UpstreamUnavailable,
)

__all__ = [
    "AuthenticationFailed",
    "MailboxSnapshot",
    "MessageGone",
    "MessageInfo",
    "UpstreamError",
    "UpstreamMailbox",
    "UpstreamUnavailable",
    "open_mailbox",
    "upstream_runtime",
]
