"""Real servers for tests and demos: a private Dovecot, and tools to fill and watch it.

Nothing here is used by the bridge at run time; it exists so that tests and the
README demo talk to a genuine IMAP server (and compare against a genuine POP3
server) instead of mocks.
"""

from sandbox.dovecot import (
    DovecotError,
    DovecotNotInstalledError,
    DovecotSandbox,
    DovecotStartError,
    Mailbox,
)
from sandbox.seeding import (
    AppendResult,
    ImapObserver,
    MessageInfo,
    SeedingError,
    append_messages,
    big_message,
    demo_messages,
    numbered_messages,
    tricky_messages,
)

__all__ = [
    "AppendResult",
    "DovecotError",
    "DovecotNotInstalledError",
    "DovecotSandbox",
    "DovecotStartError",
    "ImapObserver",
    "Mailbox",
    "MessageInfo",
    "SeedingError",
    "append_messages",
    "big_message",
    "demo_messages",
    "numbered_messages",
    "tricky_messages",
]
