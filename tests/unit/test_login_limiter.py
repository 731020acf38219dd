"""The failed-login limiter on Trio's MockClock: delays, blocks, and who can(not) be locked out."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bridge.config import LoginLimitSettings
from bridge.net.login_limiter import LoginLimiter, address_key

ATTACKER = "198.51.100.66"
OWNER = "203.0.113.10"
ACCOUNT = "alice@example.com"


def limiter(**overrides: float) -> LoginLimiter:
    values: dict[str, float] = {
        "failure_delay_seconds": 1,
        "max_delay_seconds": 15,
        "address_block_after": 30,
        "account_block_after": 10,
        "block_seconds": 300,
        "forget_after_seconds": 900,
    }
    values.update(overrides)
    return LoginLimiter(LoginLimitSettings(**values))  # type: ignore[arg-type]


async def test_delays_double_up_to_the_maximum() -> None:
    lim = limiter(account_block_after=0, address_block_after=0)
    delays = [lim.record_failure(ATTACKER, ACCOUNT) for _ in range(7)]
    assert delays == [1, 2, 4, 8, 15, 15, 15]


async def test_waiting_out_the_delay_on_the_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter()
    start = trio.current_time()
    for _ in range(4):
        await trio.sleep(lim.record_failure(ATTACKER, ACCOUNT))
    assert trio.current_time() - start == pytest.approx(1 + 2 + 4 + 8)


async def test_pair_is_blocked_after_account_block_after(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(account_block_after=3)
    for _ in range(3):
        assert not lim.check(ATTACKER, ACCOUNT).blocked
        lim.record_failure(ATTACKER, ACCOUNT)
    verdict = lim.check(ATTACKER, ACCOUNT)
    assert verdict.blocked and verdict.retry_after == pytest.approx(300)
    # The owner, elsewhere, is not blocked: the account itself never is.
    assert not lim.check(OWNER, ACCOUNT).blocked
    # The attacker may still try other accounts (until its address is blocked).
    assert not lim.check(ATTACKER, "bob@example.com").blocked
    await trio.sleep(299)
    assert lim.check(ATTACKER, ACCOUNT).blocked
    await trio.sleep(2)
    assert not lim.check(ATTACKER, ACCOUNT).blocked


async def test_address_is_blocked_for_every_account(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(address_block_after=5, account_block_after=0)
    for number in range(5):
        lim.record_failure(ATTACKER, f"user{number}")
    assert lim.check(ATTACKER, "anyone").blocked
    assert not lim.check(OWNER, "anyone").blocked


async def test_distributed_attack_delays_but_never_blocks_the_account(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter()
    delays = [lim.record_failure(f"198.51.100.{n}", ACCOUNT) for n in range(1, 50)]
    # Each attacker address failed once, yet the account's failures make every guess slow.
    assert delays[-1] == 15
    assert not lim.check(OWNER, ACCOUNT).blocked
    # A correct password is never held back: there is nothing to wait for before trying.
    assert lim.check(OWNER, ACCOUNT).retry_after == 0


async def test_success_clears_pair_and_account_but_not_the_address(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(address_block_after=6, account_block_after=4)
    for _ in range(3):
        lim.record_failure(ATTACKER, ACCOUNT)
    lim.record_success(ATTACKER, ACCOUNT)
    # The pair starts again from zero...
    assert lim.record_failure(ATTACKER, ACCOUNT) == 8  # ...but the address remembers 4 failures.
    # An attacker's own valid login does not wash away its address's failures.
    lim.record_success(ATTACKER, "mallory")
    lim.record_failure(ATTACKER, "bob")
    lim.record_failure(ATTACKER, "carol")
    assert lim.check(ATTACKER, "dave").blocked


async def test_failures_are_forgotten_after_a_quiet_period(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter()
    for _ in range(5):
        lim.record_failure(ATTACKER, ACCOUNT)
    await trio.sleep(901)
    assert lim.record_failure(ATTACKER, ACCOUNT) == 1


async def test_a_block_outlives_the_forget_period_if_longer(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(account_block_after=2, block_seconds=2000, forget_after_seconds=60)
    lim.record_failure(ATTACKER, ACCOUNT)
    lim.record_failure(ATTACKER, ACCOUNT)
    await trio.sleep(1000)
    assert lim.check(ATTACKER, ACCOUNT).blocked


async def test_blocked_attempts_are_held_back_but_not_counted(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(account_block_after=2, address_block_after=0)
    lim.record_failure(ATTACKER, ACCOUNT)
    lim.record_failure(ATTACKER, ACCOUNT)
    assert lim.blocked_delay(ATTACKER, ACCOUNT) == 2
    for _ in range(100):
        lim.check(ATTACKER, ACCOUNT)
    assert lim.blocked_delay(ATTACKER, ACCOUNT) == 2


async def test_zero_disables_delays_and_blocks() -> None:
    lim = limiter(failure_delay_seconds=0, address_block_after=0, account_block_after=0)
    assert all(lim.record_failure(ATTACKER, ACCOUNT) == 0 for _ in range(100))
    assert not lim.check(ATTACKER, ACCOUNT).blocked


async def test_settings_can_be_replaced_on_reload() -> None:
    lim = limiter()
    lim.settings = LoginLimitSettings(failure_delay_seconds=3, max_delay_seconds=60)
    assert lim.record_failure(ATTACKER, ACCOUNT) == 3


async def test_memory_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    lim = LoginLimiter(LoginLimitSettings(), max_entries=100)
    for n in range(1000):
        lim.record_failure(f"10.0.{n // 256}.{n % 256}", f"user{n}")
    assert lim.tracked == (100, 100, 100)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_address_keys(address: str, key: str) -> None:
    assert address_key(address) == key


async def test_ipv6_neighbours_share_one_budget(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(address_block_after=3, account_block_after=0)
    for host in range(1, 4):
        lim.record_failure(f"2001:db8:1:2::{host}", f"user{host}")
    assert lim.check("2001:db8:1:2::ffff", "someone").blocked
    assert not lim.check("2001:db8:1:3::1", "someone").blocked


# -- attempts in progress ---------------------------------------------------------------------


async def guess_in_parallel(lim: LoginLimiter, logins: list[tuple[str, str]], server_seconds: float = 1) -> list[str]:
    """Every login of `logins` (address, account) tried at once with a wrong password, the
    mail server taking `server_seconds` to refuse each. Returns, in order of the answers,
    "failed" (it reached the server) or "blocked"."""
    outcomes: list[str] = []

    async def guess(address: str, account: str) -> None:
        attempt = await lim.begin(address, account)
        if attempt.blocked:
            outcomes.append("blocked")
            return
        with attempt:
            await trio.sleep(server_seconds)
            attempt.failed()
            outcomes.append("failed")

    async with trio.open_nursery() as nursery:
        for address, account in logins:
            nursery.start_soon(guess, address, account)
    return outcomes


async def test_parallel_guesses_at_one_account_stop_at_the_pair_threshold(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(account_block_after=10)
    outcomes = await guess_in_parallel(lim, [(ATTACKER, ACCOUNT)] * 30)
    assert outcomes.count("failed") == 10 and outcomes.count("blocked") == 20
    assert lim.check(ATTACKER, ACCOUNT).blocked
    assert lim.in_progress == 0


async def test_parallel_guesses_at_many_accounts_stop_at_the_address_threshold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lim = limiter(address_block_after=30)
    outcomes = await guess_in_parallel(lim, [(ATTACKER, f"user{n}") for n in range(100)])
    assert outcomes.count("failed") == 30 and outcomes.count("blocked") == 70
    # Another address is not affected.
    assert await guess_in_parallel(lim, [(OWNER, "user1")]) == ["failed"]


async def test_logins_beyond_the_room_wait_and_a_success_makes_room(autojump_clock: trio.testing.MockClock) -> None:
    """Many right passwords from one address at once (users behind one NAT): none is refused,
    they go through a few at a time."""
    lim = limiter(address_block_after=3, account_block_after=0)
    started: list[float] = []

    async def login(account: str) -> None:
        attempt = await lim.begin(ATTACKER, account)
        assert not attempt.blocked
        with attempt:
            started.append(trio.current_time())
            await trio.sleep(1)  # the server says OK after a second

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for number in range(7):
            nursery.start_soon(login, f"user{number}")
    assert [round(t - start) for t in started] == [0, 0, 0, 1, 1, 1, 2]
    assert lim.in_progress == 0


async def test_an_attempt_that_ends_without_an_answer_counts_nothing(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(account_block_after=1)
    with await lim.begin(ATTACKER, ACCOUNT):
        assert lim.in_progress == 1
        pass  # the mail server was unavailable: no verdict on the password
    assert lim.in_progress == 0
    assert not lim.check(ATTACKER, ACCOUNT).blocked
    with trio.move_on_after(1):  # a session cancelled while it waits for room
        with await lim.begin(ATTACKER, ACCOUNT):
            await lim.begin(ATTACKER, ACCOUNT)
    assert lim.in_progress == 0


async def test_after_a_block_ends_guesses_go_one_at_a_time(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(account_block_after=3, block_seconds=300)
    assert (await guess_in_parallel(lim, [(ATTACKER, ACCOUNT)] * 3)).count("failed") == 3
    await trio.sleep(301)
    outcomes = await guess_in_parallel(lim, [(ATTACKER, ACCOUNT)] * 5)
    assert outcomes.count("failed") == 1 and outcomes.count("blocked") == 4


async def test_zero_thresholds_put_no_bound_on_attempts_in_progress(autojump_clock: trio.testing.MockClock) -> None:
    lim = limiter(address_block_after=0, account_block_after=0)
    outcomes = await guess_in_parallel(lim, [(ATTACKER, ACCOUNT)] * 50)
    assert outcomes == ["failed"] * 50
