"""What can go wrong upstream, as the POP3 side needs to tell it apart.

UpstreamError and its kinds become `-ERR [SYS/TEMP]` (try again later), AuthenticationFailed
becomes `-ERR [AUTH]`, MessageGone a plain `-ERR` for that message.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream failed or answered something we cannot use; POP3 says [SYS/TEMP]."""


class UpstreamImplausible(UpstreamError):
    """The upstream sent a number or size beyond `bridge.imap.limits`: no sane server does.
    The connection is dropped (never parked); the message names what was sent."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, or did not answer within the configured timeout."""


class UpstreamNotListening(UpstreamUnavailable):
    """Nothing accepts connections at the upstream address (e.g. a server restarting): worth
    retrying within the timeout (bridge.imap.pool), unlike a server that answers "no"."""


class PreauthGreeting(UpstreamError):
    """The server greeted with PREAUTH: the connection is authenticated before any LOGIN.

    Refused by both engines. The bridge authenticates every POP3 user by logging in upstream
    with that user's password; on a pre-authenticated connection any password would do, and
    an on-path attacker answering `* PREAUTH` before STARTTLS would get no TLS and no LOGIN
    and could serve its own mail. A server fault, not the user's: POP3 says [SYS/TEMP]."""

    def __init__(self) -> None:
        super().__init__(
            "connect: the server greeted with PREAUTH (already logged in); refused: "
            "the bridge must log in as each POP3 user"
        )


class AuthenticationFailed(Exception):
    """The upstream rejected the credentials; POP3 says [AUTH]."""


class MessageGone(Exception):
    """The message no longer exists upstream (another client expunged it)."""
