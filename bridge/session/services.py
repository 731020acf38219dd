"""What the sessions of one service share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bridge.config import BridgeSettings
from bridge.imap.pool import UpstreamPool
from bridge.net.client_timeouts import ClientWatchdog
from bridge.net.login_limiter import LoginLimiter
from bridge.net.maildrop_locks import MaildropLocks
from bridge.net.tls import ServerTls
from bridge.routing.router import Router
from bridge.session.message_cache import MessageCache
from bridge.session.readahead import ReadaheadBudget
from bridge.session.registry import SessionRegistry
from bridge.uidl.memory import UidlMemory

if TYPE_CHECKING:
    from bridge.oauth2.tokens import OAuth2Accounts


@dataclass
class SharedServices:
    # The settings new sessions start with (a reload replaces them; sessions in progress
    # keep the ones they started with).
    settings: BridgeSettings
    # One session per account and device in this process ([IN-USE]).
    locks: MaildropLocks = field(default_factory=MaildropLocks)
    active_sessions: int = 0
    # Ends the sessions' waits for their clients that run out of time (autologout, a client
    # not reading, the session and login limits); the service runs its task.
    watchdog: ClientWatchdog = field(default_factory=ClientWatchdog)
    # Parked connections for the next session of the same account (bridge.imap.pool).
    pool: UpstreamPool = field(init=False)
    # Failed-login delays and blocks (bridge.net.login_limiter).
    login_limiter: LoginLimiter = field(init=False)
    # The POP3 side's certificate, if one is configured (bridge.net.tls).
    server_tls: ServerTls | None = None
    # Which back end serves an account: [[routes]] and the lookup service (bridge.routing).
    router: Router = field(init=False)
    # The sessions of this process, for the admin API (bridge.session.registry).
    sessions: SessionRegistry = field(default_factory=SessionRegistry)
    # What this process remembers of maildrops' UIDL records between logins (bridge.uidl.memory).
    uidls: UidlMemory = field(default_factory=UidlMemory)
    # upstream.auth = "oauth2": the token store and one refresh at a time per account
    # (bridge.oauth2, `oauth2`); made, and its modules imported, at the first OAuth2 login.
    _oauth2: OAuth2Accounts | None = field(init=False, default=None)
    # The read-ahead bytes all sessions share (bridge.session.readahead).
    readahead_budget: ReadaheadBudget = field(init=False)
    # Big messages kept after their first RETR (bridge.session.message_cache).
    message_cache: MessageCache = field(init=False)

    def __post_init__(self) -> None:
        self.pool = UpstreamPool(lambda: self.settings)
        self.login_limiter = LoginLimiter(self.settings.login_limits)
        self.router = Router(lambda: self.settings)
        # Parked connections follow the routes: a reload retires only changed back ends'.
        self.pool.is_current = self.router.is_current
        self.readahead_budget = ReadaheadBudget(self.settings.upstream.readahead_max_bytes)
        self.message_cache = MessageCache(self.settings.cache)

    @property
    def oauth2(self) -> OAuth2Accounts:
        if self._oauth2 is None:
            from bridge.oauth2.tokens import OAuth2Accounts

            self._oauth2 = OAuth2Accounts(lambda: self.settings)
        return self._oauth2

    def close_stores(self) -> None:
        """The service stops: the token store (if one was opened) and the message cache."""
        if self._oauth2 is not None:
            self._oauth2.close()
        self.message_cache.close()
