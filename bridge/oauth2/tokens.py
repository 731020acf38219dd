"""Access tokens for logins: the device password checked, the token taken from the store or
refreshed, one refresh at a time per account.

`OAuth2Accounts` is what the sessions of one process share (bridge.session.services): the
store, a `trio.Lock` per account, the figures for the metrics. Each login gets a
`TokenSource` (the account and the password the device presented), which the pool hands to
the engine's opener (bridge.imap.engines.open_mailbox) when no parked connection fits.

A login's path: read the record (not enrolled: refused as a wrong password would be); derive
the keys from the device password in a worker thread (scrypt) and check the verifier (wrong:
refused, and counted by the failed-login limiter); a flagged account is refused with
"re-authorisation needed"; an access token with enough time left (and not the one the server
just refused) is used as it is. Otherwise, under the account's lock in this process and then
the store's lock (across processes and hosts), the record is read again (another process may
have refreshed it meanwhile, and its token is then used), the token endpoint asked once, and
the new record (the rotated refresh token with the new access token) saved before the token
is used. `invalid_grant` on the refresh_token grant flags the account for re-enrolment.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from bridge.config import BridgeSettings, OAuth2Settings, account_key
from bridge.oauth2.client import TokenAnswer, TokenEndpoint
from bridge.oauth2.errors import (
    DeviceLoginRefused,
    InvalidGrant,
    ReauthorisationNeeded,
    StoreUnavailable,
    TokenEndpointUnavailable,
    TokenRequestRefused,
)
from bridge.oauth2.records import (
    AccountRecord,
    Keys,
    RecordDamaged,
    Tokens,
    WrongPassword,
    derive_keys,
)
from bridge.oauth2.store import FileStore, TokenStore
from bridge.ops import metrics
from bridge.ops.logs import get_logger

_log = get_logger(component="oauth2")
# Refresh when less than this is left of the access token (at most half its lifetime).
REFRESH_MARGIN_SECONDS = 300.0
# The token endpoint's share of upstream.timeout_seconds (the rest is for the IMAP login), so
# a slow endpoint is reported as such rather than as an upstream timeout.
_TOKEN_ENDPOINT_SHARE = 2 / 3
# scrypt takes 32 MiB a run: at most this many at once, whatever the number of logins.
_KDF_THREADS = 4


def open_store(settings: OAuth2Settings, timeout_seconds: float) -> TokenStore:
    """The store `oauth2.store` names (redis-py is imported only when it names Redis)."""
    kind, where = settings.store_location
    if kind == "file":
        return FileStore(where)
    from bridge.oauth2.redis_store import RedisStore

    return RedisStore(where, timeout_seconds)


class OAuth2Accounts:
    """The OAuth2 side of one bridge process (created when the service starts; the store
    is opened at the first OAuth2 login, and again if `oauth2.store` changes on a reload)."""

    def __init__(self, settings: Callable[[], BridgeSettings]) -> None:
        self._settings = settings
        self._store: TokenStore | None = None
        self._store_of: tuple[str, float] | None = None
        self._locks: dict[str, trio.Lock] = {}
        self._flagged: set[str] = set()
        self._kdf_limiter: trio.CapacityLimiter | None = None

    @property
    def settings(self) -> OAuth2Settings:
        return self._settings().oauth2

    @property
    def timeout(self) -> float:
        return self._settings().upstream.timeout_seconds

    def store(self) -> TokenStore:
        wanted = (self.settings.store, self.timeout)
        if self._store is None or self._store_of != wanted:
            if self._store is not None:
                self._store.close()
            self._store, self._store_of = open_store(self.settings, self.timeout), wanted
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    async def record(self, account: str) -> AccountRecord | None:
        """The account's record, None if not enrolled (a damaged one is logged and treated so)."""
        data = await self.store().load(account)
        if data is None:
            return None
        try:
            record = AccountRecord.loads(data)
        except RecordDamaged as exc:
            _log.error("oauth2_record_damaged", account=account, error=str(exc))
            return None
        self._note_flag(account, record)
        return record

    async def fingerprint(self, account: str) -> str | None:
        """What identifies the account's current enrolment and device password (None: not
        enrolled). The pool compares it with a parked connection's, with the password."""
        record = await self.record(account)
        return None if record is None else record.fingerprint

    def tokens(self, account: str, password: str) -> TokenSource:
        return TokenSource(self, account, password)

    async def derive(self, password: str, record: AccountRecord) -> Keys:
        if self._kdf_limiter is None:
            self._kdf_limiter = trio.CapacityLimiter(_KDF_THREADS)
        return await trio.to_thread.run_sync(derive_keys, password, record.kdf, limiter=self._kdf_limiter)

    def lock(self, account: str) -> trio.Lock:
        return self._locks.setdefault(account_key(account), trio.Lock())

    def _note_flag(self, account: str, record: AccountRecord) -> None:
        key = account_key(account)
        if record.reenrolment is not None:
            self._flagged.add(key)
        else:
            self._flagged.discard(key)
        metrics.OAUTH2_REENROLMENT_NEEDED.set(len(self._flagged))

    # -- asking the token endpoint ------------------------------------------------------------------

    async def request_token(self, record: AccountRecord, tokens: Tokens) -> TokenAnswer:
        """The grant's request for a new access token, counted by outcome."""
        endpoint = TokenEndpoint(self.settings, self.timeout * _TOKEN_ENDPOINT_SHARE)
        grant = record.grant
        try:
            if grant == "refresh_token":
                if not tokens.refresh_token:
                    raise InvalidGrant("no refresh token stored")
                answer = await endpoint.refresh(tokens.refresh_token)
            elif grant == "client_credentials":
                answer = await endpoint.client_credentials()
            else:
                answer = await endpoint.jwt_bearer(record.account)
        except InvalidGrant as exc:
            if grant != "refresh_token":
                # Nobody consents per account for the app-only grants: the operator must
                # fix the application or its permissions, not enrol the account again.
                self._refused(record.account, exc)
            else:
                metrics.OAUTH2_REFRESHES.labels("invalid_grant").inc()
            raise
        except TokenEndpointUnavailable as exc:
            metrics.OAUTH2_REFRESHES.labels("unavailable").inc()
            _log.warning("oauth2_token_endpoint_unavailable", account=record.account, error=str(exc))
            raise
        except TokenRequestRefused as exc:
            self._refused(record.account, exc)
            raise
        metrics.OAUTH2_REFRESHES.labels("ok").inc()
        return answer

    def _refused(self, account: str, exc: TokenRequestRefused) -> None:
        metrics.OAUTH2_REFRESHES.labels("refused").inc()
        _log.warning("oauth2_token_refused", account=account, error=exc.error, description=exc.description)

    async def flag(self, account: str, record: AccountRecord, reason: str) -> None:
        record.reenrolment = {"since": time.time(), "reason": reason}
        await self.store().save(account, record.dumps())
        self._note_flag(account, record)
        _log.warning("oauth2_reenrolment_needed", account=account, reason=reason)


class TokenSource:
    """One login's access tokens (bridge.imap.engines.BearerTokens)."""

    def __init__(self, accounts: OAuth2Accounts, account: str, password: str) -> None:
        self._accounts = accounts
        self.account = account
        self._password = password
        self._keys: Keys | None = None
        self.mechanism = accounts.settings.mechanism

    async def _unlock(self, record: AccountRecord) -> Tokens:
        """The record's tokens, the device password checked (scrypt once per login and salt)."""
        if self._keys is None or self._keys.salt != record.kdf.salt:
            self._keys = await self._accounts.derive(self._password, record)
        try:
            return record.unseal(self._keys)
        except WrongPassword:
            raise DeviceLoginRefused("wrong_password") from None
        except RecordDamaged as exc:
            _log.error("oauth2_record_damaged", account=self.account, error=str(exc))
            raise StoreUnavailable("token store: the account's record is damaged") from None

    async def _current(self) -> tuple[AccountRecord, Tokens]:
        record = await self._accounts.record(self.account)
        if record is None:
            raise DeviceLoginRefused("not_enrolled")
        tokens = await self._unlock(record)
        if record.reenrolment is not None:
            raise ReauthorisationNeeded(f"the account needs re-enrolment ({record.reenrolment.get('reason')})")
        return record, tokens

    async def access_token(self, rejected: str | None = None) -> str:
        accounts = self._accounts
        record, tokens = await self._current()
        if tokens.fresh(time.time(), REFRESH_MARGIN_SECONDS) and tokens.access_token != rejected:
            assert tokens.access_token is not None
            return tokens.access_token
        async with accounts.lock(self.account):
            async with accounts.store().lock(self.account, accounts.timeout):
                # Another session or process may have refreshed while this one waited.
                record, tokens = await self._current()
                if tokens.fresh(time.time(), REFRESH_MARGIN_SECONDS) and tokens.access_token != rejected:
                    assert tokens.access_token is not None
                    return tokens.access_token
                try:
                    answer = await accounts.request_token(record, tokens)
                except InvalidGrant:
                    if record.grant != "refresh_token":
                        raise
                    await accounts.flag(self.account, record, "invalid_grant")
                    raise ReauthorisationNeeded("the token endpoint answered invalid_grant") from None
                rotated = answer.refresh_token is not None and answer.refresh_token != tokens.refresh_token
                now = time.time()
                new = Tokens(
                    refresh_token=answer.refresh_token or tokens.refresh_token,
                    access_token=answer.access_token,
                    expires_at=now + answer.expires_in,
                    lifetime=answer.expires_in,
                )
                assert self._keys is not None
                record.seal(self._keys, new)
                record.last_refresh = now
                # Saved before the new token is used: a rotated refresh token is the only one
                # that works from now on (strict rotation), and must survive a crash.
                await accounts.store().save(self.account, record.dumps())
        _log.info("oauth2_token_refreshed", account=self.account, grant=record.grant, expires_in=round(answer.expires_in), rotated=rotated)
        return answer.access_token
