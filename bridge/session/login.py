"""Logging a POP3 client in: who it is (account and device, bridge.policy.identity), the
failed-login limits (bridge.net.login_limiter), the upstream login (a parked connection or a
fresh one, bridge.imap.pool), the [IN-USE] lock, and the maildrop the device sees
(bridge.policy.deletion). Every refusal is a `LoginRefused`, which the conversation turns into
a log event, a metric and an -ERR in one place (`refuse`).

The account's back end (bridge.routing: its route, or the lookup service's answer) decides the
upstream settings of the session: where its connection is opened, as whom, and its maildrop.
A lookup that refuses is an `-ERR [AUTH]` with its text (and counts as a failed login); one
that fails is `-ERR [SYS/TEMP]`, as a back end that is down is for its own accounts only.

With `upstream.auth = "oauth2"` (for the account's back end) the password is the device's,
checked by the bridge against the account's enrolment (bridge.oauth2): a wrong one, or an
account nobody enrolled, is refused like a wrong password; the upstream sees an access token
instead."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import structlog
import trio

from bridge.config import BridgeSettings
from bridge.imap.engines import Credential
from bridge.imap.errors import AuthenticationFailed, UpstreamError
from bridge.imap.lease import Lease
from bridge.net.listeners import ClientConnection
from bridge.net.maildrop_locks import MaildropInUse
from bridge.oauth2.errors import DeviceLoginRefused, ReauthorisationNeeded
from bridge.ops import metrics
from bridge.ops.logs import get_logger
from bridge.policy.deletion import MaildropView, open_maildrop
from bridge.policy.identity import InvalidLogin, LoginIdentity, resolve_login
from bridge.pop3 import LoginRequest, ResponseCode
from bridge.routing.lookup import LookupRefused, LookupRequest, LookupUnavailable
from bridge.routing.routes import Backend
from bridge.session.services import SharedServices

_log = get_logger()
_UNAVAILABLE = "mail server unavailable, try again later"


@dataclass(eq=False)
class LoginRefused(Exception):
    """A login the client is refused: `reason` (the log's and the metric's), `text` and
    `code` (its -ERR), how long to hold the answer back, and what else the log says."""

    reason: str
    text: str
    code: ResponseCode | None
    event: str = "login_failed"
    warning: bool = False
    delay: float = 0.0
    fields: dict[str, object] = field(default_factory=dict)


@dataclass
class LoggedIn:
    identity: LoginIdentity
    lease: Lease
    view: MaildropView
    backend: Backend
    # The session's settings from now on: [upstream] replaced by its back end's.
    settings: BridgeSettings
    # What checking a connection out again takes (bridge.session.upstream): the password the
    # pool compares, and what a fresh login uses if not that (OAuth2's tokens). Kept in the
    # session's memory only, never logged.
    pool_password: str = field(repr=False, default="")
    credential: Credential | None = field(repr=False, default=None)


def lookup_request(account: str, password: str, client: ClientConnection | None, attempt: int) -> LookupRequest:
    """What the lookup service is told about this login (bridge.routing.lookup)."""
    if client is None:
        return LookupRequest(account, password, attempt)
    return LookupRequest(
        account, password, attempt, client.address, client.tls_active, client.proxy_source, client.proxy_destination
    )


async def log_in(
    request: LoginRequest, services: SharedServices, settings: BridgeSettings, address: str, exits: ExitStack,
    *, client: ClientConnection | None = None, attempt_number: int = 1,
) -> LoggedIn:
    """Log `request` in for a client at `address` (`client`: its connection, for the lookup
    service; `attempt_number`: the login attempt on this connection); the maildrop lock goes
    into `exits` (held for the rest of the session). Raises LoginRefused."""
    structlog.contextvars.bind_contextvars(user=request.username)
    try:
        identity = resolve_login(request.username, settings.delete)
    except InvalidLogin as exc:
        raise LoginRefused("device_name", f"invalid login: {exc}", ResponseCode.AUTH) from None
    structlog.contextvars.bind_contextvars(account=identity.account, device=identity.device)
    limiter = services.login_limiter
    # Limited by the account as the upstream compares it: "Alice" and "alice" are one.
    # Counted as in progress until the mail server has answered; may wait for other attempts
    # from this address to end first.
    account = identity.account_key
    attempt = await limiter.begin(address, account)
    if attempt.blocked:
        # Refused without asking the mail server; not counted, so the block does not grow.
        raise LoginRefused(
            "blocked", "too many failed logins, try again later", ResponseCode.SYS_TEMP, event="login_blocked",
            warning=True, delay=limiter.blocked_delay(address, account), fields={"retry_after": round(attempt.retry_after, 1)},
        )
    backend: Backend | None = None
    oauth2 = False
    try:
        backend = await services.router.route(lookup_request(identity.account, request.password, client, attempt_number))
        structlog.contextvars.bind_contextvars(backend=backend.name)
        oauth2 = backend.upstream.auth == "oauth2"
        if oauth2:
            pool_password, credential = await _oauth2_credentials(identity.account, request.password, services)
        else:
            pool_password, credential = request.password, None
        lease = await services.pool.checkout(identity.account, pool_password, credential, backend=backend)
    except LookupRefused as exc:
        delay = max(attempt.failed(), exc.wait)
        raise LoginRefused("lookup_refused", exc.text, ResponseCode.AUTH, delay=delay, fields={"delay": delay}) from None
    except LookupUnavailable as exc:
        raise LoginRefused("lookup", _UNAVAILABLE, ResponseCode.SYS_TEMP, warning=True, fields={"error": str(exc)}) from None
    except ReauthorisationNeeded:
        raise LoginRefused(
            "reauthorisation", "re-authorisation needed: the administrator must enrol this account again",
            ResponseCode.AUTH, warning=True,
        ) from None
    except AuthenticationFailed as exc:
        assert backend is not None
        if oauth2 and not isinstance(exc, DeviceLoginRefused):
            # The device password was right; the mail server refused a token just refreshed
            # (the application's permissions or the mailbox's): for the operator to fix.
            metrics.backend_login(backend.name, "upstream").inc()
            raise LoginRefused(
                "token_refused", "the mail server refused the bridge's authorisation for this account",
                ResponseCode.SYS_PERM, warning=True,
            ) from None
        metrics.backend_login(backend.name, "credentials").inc()
        delay = attempt.failed()
        fields: dict[str, object] = {"mechanism": request.mechanism, "delay": delay}
        if isinstance(exc, DeviceLoginRefused):
            fields["oauth2"] = exc.reason
        raise LoginRefused("credentials", "invalid user name or password", ResponseCode.AUTH, delay=delay, fields=fields) from None
    except UpstreamError as exc:
        assert backend is not None
        metrics.backend_login(backend.name, "upstream").inc()
        metrics.backend_error(backend.name, "login").inc()
        raise LoginRefused("upstream", _UNAVAILABLE, ResponseCode.SYS_TEMP, warning=True, fields={"error": str(exc)}) from None
    finally:
        attempt.end()
    if backend.upstream != settings.upstream:
        settings = settings.model_copy(update={"upstream": backend.upstream})
    with ExitStack() as held:
        try:
            held.enter_context(services.locks.hold(identity.lock_key))
        except MaildropInUse:
            await lease.release()
            raise LoginRefused("in_use", "maildrop already in use by another session", ResponseCode.IN_USE) from None
        try:
            try:
                view = await open_maildrop(lease.mailbox, identity, settings, services.uidls)
            except UpstreamError:
                if not lease.reused:
                    raise
                # A parked connection cut while parked (a NAT's timeout, a server restart)
                # can be handed over before its keeper notices: it is dropped, and the login
                # goes on with another connection rather than failing the device's poll.
                # (The pool logs it as pool_connection_dropped when it comes back broken.)
                await lease.release()
                try:
                    lease = await services.pool.checkout(identity.account, pool_password, credential, backend=backend)
                except AuthenticationFailed:
                    # The password changed upstream in that instant.
                    raise LoginRefused("credentials", "invalid user name or password", ResponseCode.AUTH) from None
                view = await open_maildrop(lease.mailbox, identity, settings, services.uidls)
        except UpstreamError as exc:
            await lease.release()
            metrics.backend_error(backend.name, "login").inc()
            raise LoginRefused("snapshot", _UNAVAILABLE, ResponseCode.SYS_TEMP, warning=True, fields={"error": str(exc)}) from None
        exits.enter_context(held.pop_all())
    limiter.record_success(address, account)
    metrics.LOGINS.labels("ok").inc()
    metrics.backend_login(backend.name, "ok").inc()
    return LoggedIn(identity, lease, view, backend, settings, pool_password, credential)


async def _oauth2_credentials(account: str, password: str, services: SharedServices) -> tuple[str, Credential]:
    """What an OAuth2 account's connections are checked out with: the device password and
    the enrolment's fingerprint, compared with parked connections' (so a new device password,
    a re-enrolment or a removal takes effect at the next login), and the tokens a fresh
    login uses."""
    fingerprint = await services.oauth2.fingerprint(account)
    if fingerprint is None:
        raise DeviceLoginRefused("not_enrolled")
    return f"{fingerprint}\0{password}", services.oauth2.tokens(account, password)


async def refuse(refusal: LoginRefused) -> None:
    """Log and count a refused login, then hold its answer back as long as it says."""
    log = _log.warning if refusal.warning else _log.info
    log(refusal.event, reason=refusal.reason, **refusal.fields)
    metrics.LOGINS.labels("failed").inc()
    metrics.LOGIN_FAILURES.labels(refusal.reason).inc()
    if refusal.delay:
        await trio.sleep(refusal.delay)
