"""The IMAP engines, by `upstream.engine`: how each opens a channel, and what it needs running.

"trio", the bridge's own (the default, chosen on the benchmark's evidence: docs/performance.md),
needs nothing; "aioimaplib" needs an asyncio loop inside Trio (trio-asyncio). An engine's
modules, and the libraries they use, are imported only when that engine is configured: a
bridge serving with "trio" never imports aioimaplib or trio_asyncio.

Adding an engine: a module with `open_channel(settings) -> ImapChannel` (and a `runtime()`
context if it needs one), and one entry in `_ENGINES`.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import trio

from bridge.config import UpstreamSettings
from bridge.imap.channel import ImapChannel
from bridge.imap.errors import AuthenticationFailed, UpstreamError
from bridge.imap.mailbox import ImapMailbox

# engine name -> the module with its open_channel (and runtime, if it has one)
_ENGINES = {
    "trio": "bridge.imap.trio_engine.connect",
    "aioimaplib": "bridge.imap.aioimaplib_engine.channel",
}


@dataclass(frozen=True)
class Engine:
    name: str
    open_channel: Callable[[UpstreamSettings], Awaitable[ImapChannel]]
    runtime: Callable[[], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _nothing_to_run() -> AsyncIterator[None]:
    yield


def engine(name: str) -> Engine:
    """The engine `upstream.engine` names (its module imported now, not before)."""
    module: Any = importlib.import_module(_ENGINES[name])
    return Engine(
        name,
        cast(Callable[[UpstreamSettings], Awaitable[ImapChannel]], module.open_channel),
        getattr(module, "runtime", _nothing_to_run),
    )


def engine_runtime(name: str) -> AbstractAsyncContextManager[None]:
    """What the engine needs running around the service (a null context for "trio")."""
    return engine(name).runtime()


class BearerTokens(Protocol):
    """Where an OAuth2 login gets its access token (bridge.oauth2.TokenSource): the device
    password is checked and the token refreshed there, never here."""

    mechanism: str  # oauth2.mechanism

    async def access_token(self, rejected: str | None = None) -> str:
        """A valid access token; with `rejected` (a token the server just refused), a newer
        one than that."""
        ...


# What a connection logs in with: the POP3 password (upstream.auth = "password"), or OAuth2.
Credential = str | BearerTokens


async def open_mailbox(settings: UpstreamSettings, username: str, credential: Credential) -> ImapMailbox:
    """A fresh connection from the configured engine, logged in as the POP3 user. Raises
    AuthenticationFailed, UpstreamNotListening, UpstreamUnavailable or UpstreamError.

    With OAuth2 the token comes first (a wrong device password or a token endpoint that is
    down costs no IMAP connection), and a token the server refuses (revoked, or expired
    early) is refreshed once and tried once more."""
    token = None if isinstance(credential, str) else await credential.access_token()
    channel = await engine(settings.engine).open_channel(settings)
    mailbox = ImapMailbox(channel, settings)
    try:
        if isinstance(credential, str):
            await mailbox.log_in(username, credential)
            return mailbox
        assert token is not None
        try:
            await mailbox.log_in_bearer(username, token, credential.mechanism)
        except AuthenticationFailed:
            token = await credential.access_token(rejected=token)
            if not channel.usable:
                channel = await engine(settings.engine).open_channel(settings)
                mailbox = ImapMailbox(channel, settings)
            await mailbox.log_in_bearer(username, token, credential.mechanism)
    except BaseException:
        channel.close()
        raise
    return mailbox


async def open_admin_mailbox(settings: UpstreamSettings, login: str) -> ImapMailbox:
    """A fresh connection logged in as the back end's administrator (`upstream.admin_login`,
    its password read from `upstream.admin_password_file` now), acting as the upstream login
    `login`. Raises UpstreamError when no admin login is configured or it cannot be read, and
    what `open_mailbox` raises."""
    if not settings.admin_login:
        raise UpstreamError("no admin login configured for this back end (upstream.admin_login)")
    try:
        password = (await trio.Path(settings.admin_password_file).read_text()).strip()
    except OSError as exc:
        raise UpstreamError(f"admin login: the password file cannot be read ({exc.strerror})") from None
    channel = await engine(settings.engine).open_channel(settings)
    mailbox = ImapMailbox(channel, settings)
    try:
        await mailbox.log_in_authorized(login, settings.admin_login, password)
    except BaseException:
        channel.close()
        raise
    return mailbox
