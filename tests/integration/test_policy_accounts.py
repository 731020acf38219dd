"""Account names are compared case-insensitively, as the upstream compares them: Dovecot folds
logins to lower case (auth_username_format = %Lu), so `Alice@example.com` opens alice's
mailbox and must get alice's policy, her devices' locks and her login limits. Device names
must be exactly the allowed characters. docs/devices.md, "User names and devices"."""

from __future__ import annotations

import base64
from collections.abc import Callable

from sandbox import Mailbox, numbered_messages
from tests.harness import RawPop3, ThreadedBridge, wait_for_event
from tests.integration.policy_support import poll, visible

BridgeFactory = Callable[..., ThreadedBridge]


def seed(box: Mailbox, count: int) -> list[int]:
    return box.append(list(numbered_messages(count))).uids


def test_an_account_policy_applies_whatever_the_case_of_the_login(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    uids = seed(mailbox, 3)
    bridge = bridge_factory(delete={"policy": "expunge", "accounts": {mailbox.user: {"policy": "per-client"}}})
    shouted = mailbox.user.upper()
    assert shouted != mailbox.user
    # The upper-cased login opens the same mailbox; DELE + QUIT hides, it does not expunge.
    assert poll(bridge.port, f"{shouted}#phone", mailbox.password) == [1, 2, 3]
    assert mailbox.observer().uids() == uids
    assert visible(bridge.port, f"{mailbox.user}#laptop", mailbox.password) == [1, 2, 3]
    # The phone is the same device in either case: its state applies to both spellings.
    assert visible(bridge.port, f"{mailbox.user}#phone", mailbox.password) == []
    assert visible(bridge.port, f"{mailbox.user.capitalize()}#phone", mailbox.password) == []


def test_one_session_per_device_whatever_the_case_of_the_account(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 1)
    bridge = bridge_factory()
    with RawPop3("127.0.0.1", bridge.port) as first:
        first.login(f"{mailbox.user}#phone", mailbox.password)
        with RawPop3("127.0.0.1", bridge.port) as second:
            assert second.command(f"USER {mailbox.user.upper()}#phone".encode()).startswith(b"+OK")
            reply = second.command(f"PASS {mailbox.password}".encode())
            assert reply.startswith(b"-ERR [IN-USE]"), reply
            # Another device of the account may poll meanwhile.
            assert second.command(f"USER {mailbox.user.upper()}#laptop".encode()).startswith(b"+OK")
            assert second.command(f"PASS {mailbox.password}".encode()).startswith(b"+OK")
        assert first.command(b"QUIT").startswith(b"+OK")


def test_failed_logins_count_against_the_account_whatever_its_case(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    bridge = bridge_factory(
        login_limits={"failure_delay_seconds": 0, "account_block_after": 2, "address_block_after": 0},
        pool={"park_seconds": 0},
    )
    for login in (mailbox.user.upper(), mailbox.user.capitalize()):
        with RawPop3("127.0.0.1", bridge.port) as pop:
            assert pop.command(f"USER {login}".encode()).startswith(b"+OK")
            assert pop.command(b"PASS wrong-password").startswith(b"-ERR [AUTH]")
    # Two failures against one account from this address: blocked, in any spelling.
    with RawPop3("127.0.0.1", bridge.port) as pop:
        assert pop.command(f"USER {mailbox.user}".encode()).startswith(b"+OK")
        assert pop.command(f"PASS {mailbox.password}".encode()).startswith(b"-ERR [SYS/TEMP]")
    wait_for_event(bridge, "login_blocked")


def test_a_device_name_with_a_trailing_newline_is_refused(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    # A fixed login mapped (in bridge.toml or the environment) to a device name ending in a
    # newline: "$" in the device-name pattern would match before it.
    seed(mailbox, 1)
    bridge = bridge_factory(delete={"policy": "per-client", "logins": {"printer": f"{mailbox.user}#phone\n"}})
    with RawPop3("127.0.0.1", bridge.port) as pop:
        assert pop.command(b"USER printer").startswith(b"+OK")
        reply = pop.command(f"PASS {mailbox.password}".encode())
        assert reply.startswith(b"-ERR [AUTH] invalid login"), reply
        # The POP3 side refuses control characters in a login of its own accord.
        response = base64.b64encode(f"\0{mailbox.user}#phone\n\0{mailbox.password}".encode())
        assert pop.command(b"AUTH PLAIN " + response).startswith(b"-ERR")
        assert pop.command(b"QUIT").startswith(b"+OK")
