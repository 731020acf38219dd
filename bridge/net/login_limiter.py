"""Slowing down password guessing without letting an attacker lock a real user out.

Three counters of failed logins, each forgotten after `forget_after_seconds` without a new
failure:

- per client address (IPv6 clients by their /64, which one subscriber usually has whole);
- per (account, address) pair;
- per account, over all addresses.

After a failed login the client waits before it hears -ERR: `failure_delay_seconds`, doubled for
every further failure counted against its address, pair or account, at most
`max_delay_seconds`. Holding the answer back also holds that connection's slot, and the
per-address connection cap bounds how many guesses one address can have waiting at once.

Blocking (answering -ERR [SYS/TEMP] without asking the mail server) is reserved for the
address and the pair:

- an address with `address_block_after` failures is blocked for `block_seconds`; whatever is
  behind that address can be refused, but nobody elsewhere is affected;
- a pair with `account_block_after` failures is blocked for `block_seconds`; the attacker
  stops guessing that account from there, while the real user, logging in from any other
  address, is not blocked.

A login counts from the moment it is tried, not only once the mail server has answered: up to
`account_block_after` attempts of one pair, and `address_block_after` of one address, may be in
progress at once (`begin`); further ones wait for one of those to end, then are checked again.
Without that, guesses sent in parallel would all reach the mail server before the first
failure was counted. Waiting rather than refusing keeps many users behind one NAT address,
logging in at the same moment with right passwords, from being turned away: their logins go
through a few at a time. After a block has ended, the next attempts of that pair or address
go one at a time (each failure blocks again). The per-address connection cap bounds how many
can wait.

The account counter never blocks: anyone can make an account fail from anywhere, so an
account-wide block would hand every attacker a switch to lock the real user out. It only adds
delay to *failed* attempts; a correct password is never delayed by it, so a distributed attack
slows the attackers and not the owner. A successful login clears the pair's and the account's
counters (the owner just proved the password) but never the address's: an attacker holding
one valid account must not be able to wash away the failures of its guesses at others.

Times come from the Trio clock, so tests run on a MockClock. Memory is bounded: each table keeps
at most `max_entries` records and forgets the least recently failed first; attempts in progress
are held only while they last.

The limiter lives in one process: with `server.workers` > 1 each worker counts its own
attempts and failures, so an address whose connections go to N workers gets up to N times
the thresholds.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import trio

from bridge.config import LoginLimitSettings

__all__ = ["LoginAttempt", "LoginLimiter", "LoginVerdict", "address_key"]

_MAX_ENTRIES = 65536
_K = TypeVar("_K")


def address_key(address: str) -> str:
    """The unit an address is limited by: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address  # not an IP (a UNIX socket, "unknown"): as given
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _decrement(counter: Counter[_K], item: _K) -> None:
    counter[item] -= 1
    if counter[item] <= 0:
        del counter[item]


@dataclass
class _Record:
    failures: int = 0
    last_failure: float = -math.inf
    blocked_until: float = -math.inf


class _Table:
    """Failure records by key, least recently failed first, at most `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self._records: OrderedDict[object, _Record] = OrderedDict()
        self._max_entries = max_entries

    def __len__(self) -> int:
        return len(self._records)

    def peek(self, key: object, now: float, forget_after: float) -> _Record:
        record = self._records.get(key)
        if record is None:
            return _Record()
        if now - record.last_failure > forget_after and now >= record.blocked_until:
            del self._records[key]
            return _Record()
        return record

    def fail(self, key: object, now: float, forget_after: float) -> _Record:
        record = self.peek(key, now, forget_after)
        record.failures += 1
        record.last_failure = now
        self._records[key] = record
        self._records.move_to_end(key)
        while len(self._records) > self._max_entries:
            self._records.popitem(last=False)
        return record

    def clear(self, key: object) -> None:
        self._records.pop(key, None)


@dataclass(frozen=True, slots=True)
class LoginVerdict:
    """``blocked``: refuse this attempt without checking it; ``retry_after`` seconds until
    the block ends (0 when not blocked)."""

    blocked: bool
    retry_after: float = 0.0


class LoginAttempt:
    """One login being tried (`LoginLimiter.begin`). Unless ``blocked`` (then it was refused
    and counts nowhere), it is in progress until `failed()` or `end()` (a success, or an
    answer that says nothing about the password), or until its ``with`` block ends."""

    def __init__(self, limiter: LoginLimiter | None, address: str, account: str, verdict: LoginVerdict) -> None:
        self._limiter = limiter
        self.address = address
        self.account = account
        self.blocked = verdict.blocked
        self.retry_after = verdict.retry_after

    def failed(self) -> float:
        """The password was wrong: count the failure; returns how long to wait before answering."""
        limiter, self._limiter = self._limiter, None
        if limiter is None:
            raise RuntimeError("this attempt is over")
        limiter._end(self.address, self.account)
        return limiter.record_failure(self.address, self.account)

    def end(self) -> None:
        """No longer in progress, nothing counted (a no-op once it has ended)."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._end(self.address, self.account)

    def __enter__(self) -> LoginAttempt:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end()


class LoginLimiter:
    def __init__(
        self,
        settings: LoginLimitSettings,
        clock: Callable[[], float] = trio.current_time,
        max_entries: int = _MAX_ENTRIES,
    ) -> None:
        # Public so a configuration reload can replace it; read on every call.
        self.settings = settings
        self._clock = clock
        self._addresses = _Table(max_entries)
        self._pairs = _Table(max_entries)
        self._accounts = _Table(max_entries)
        # Attempts in progress, by address key and by (account, address key); an entry lives
        # only while its count is above zero.
        self._trying_addresses: Counter[str] = Counter()
        self._trying_pairs: Counter[tuple[str, str]] = Counter()
        # Set (and replaced) whenever an attempt ends: waiting attempts look again.
        self._attempt_ended = trio.Event()

    def check(self, address: str, account: str) -> LoginVerdict:
        """Before a login is tried: is it blocked?"""
        now = self._clock()
        key = address_key(address)
        forget = self.settings.forget_after_seconds
        until = max(
            self._addresses.peek(key, now, forget).blocked_until,
            self._pairs.peek((account, key), now, forget).blocked_until,
        )
        if until > now:
            return LoginVerdict(blocked=True, retry_after=until - now)
        return LoginVerdict(blocked=False)

    async def begin(self, address: str, account: str) -> LoginAttempt:
        """Start a login attempt: at once when the address and the pair have room for one
        more attempt in progress, else after waiting for room. A blocked attempt (also one
        that became blocked while it waited) comes back with ``blocked`` set, not started."""
        key = address_key(address)
        pair = (account, key)
        while True:
            verdict = self.check(address, account)
            if verdict.blocked:
                return LoginAttempt(None, address, account, verdict)
            if self._has_room(key, pair):
                self._trying_addresses[key] += 1
                self._trying_pairs[pair] += 1
                return LoginAttempt(self, address, account, verdict)
            await self._attempt_ended.wait()

    def _has_room(self, key: str, pair: tuple[str, str]) -> bool:
        now = self._clock()
        settings = self.settings
        forget = settings.forget_after_seconds
        for threshold, failures, trying in (
            (settings.address_block_after, self._addresses.peek(key, now, forget).failures, self._trying_addresses[key]),
            (settings.account_block_after, self._pairs.peek(pair, now, forget).failures, self._trying_pairs[pair]),
        ):
            # Room for the attempts that may still fail before the threshold blocks; once it
            # has (and the block has ended), for one at a time.
            if threshold and trying >= max(1, threshold - failures):
                return False
        return True

    def _end(self, address: str, account: str) -> None:
        key = address_key(address)
        _decrement(self._trying_addresses, key)
        _decrement(self._trying_pairs, (account, key))
        self._attempt_ended.set()
        self._attempt_ended = trio.Event()

    @property
    def in_progress(self) -> int:
        """Attempts in progress now (for tests)."""
        return sum(self._trying_addresses.values())

    def record_failure(self, address: str, account: str) -> float:
        """Count a failed login; returns how long to wait before answering it."""
        now = self._clock()
        settings = self.settings
        forget = settings.forget_after_seconds
        key = address_key(address)
        by_address = self._addresses.fail(key, now, forget)
        by_pair = self._pairs.fail((account, key), now, forget)
        by_account = self._accounts.fail(account, now, forget)
        if settings.address_block_after and by_address.failures >= settings.address_block_after:
            by_address.blocked_until = now + settings.block_seconds
        if settings.account_block_after and by_pair.failures >= settings.account_block_after:
            by_pair.blocked_until = now + settings.block_seconds
        return self._delay(max(by_address.failures, by_pair.failures, by_account.failures))

    def blocked_delay(self, address: str, account: str) -> float:
        """How long to hold back the answer to a blocked attempt (not counted as a failure)."""
        now = self._clock()
        key = address_key(address)
        forget = self.settings.forget_after_seconds
        failures = max(
            self._addresses.peek(key, now, forget).failures,
            self._pairs.peek((account, key), now, forget).failures,
        )
        return self._delay(failures)

    def record_success(self, address: str, account: str) -> None:
        self._pairs.clear((account, address_key(address)))
        self._accounts.clear(account)

    def _delay(self, failures: int) -> float:
        settings = self.settings
        if failures <= 0 or settings.failure_delay_seconds <= 0:
            return 0.0
        # min() before the power keeps the number small for huge failure counts.
        doublings = min(failures - 1, 32)
        return min(settings.failure_delay_seconds * 2.0**doublings, settings.max_delay_seconds)

    @property
    def tracked(self) -> tuple[int, int, int]:
        """Records held (addresses, pairs, accounts): for tests of the memory bound."""
        return len(self._addresses), len(self._pairs), len(self._accounts)
