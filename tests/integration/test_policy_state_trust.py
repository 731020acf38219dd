"""State records are read as hostile input. Anyone who can put a message into the state folder
(the mailbox owner, a shared-folder writer, `+detail` delivery, a Sieve rule) can plant one;
only records signed with the server key (`delete.state_key`) for this account are trusted, and
no record, signed or not, can make the bridge delete mail it may not delete, hide mail that
arrives later, crash a session or hold up other sessions. docs/design.md, "Signed records"."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import trio

from bridge.imap.engines import engine_runtime, open_mailbox
from bridge.policy.device_state import DeviceStateStore, StateSigner
from bridge.policy.uid_ranges import UidRanges
from sandbox import Mailbox, numbered_messages
from tests.harness import (
    ENGINES,
    TEST_STATE_KEY,
    Pop3Client,
    ThreadedBridge,
    bridge_settings,
    wait_for_event,
)
from tests.integration.policy_support import (
    STATE_FOLDER,
    json_body,
    plant_state,
    poll,
    signed,
    state_body,
    state_message,
    state_records,
    visible,
)

BridgeFactory = Callable[..., ThreadedBridge]
EVERY_UID = "1:4294967295"
FAR_FUTURE = "2030-01-01T00:00:00+00:00"


def seed(box: Mailbox, count: int, start: int = 1) -> list[int]:
    return box.append(list(numbered_messages(count, start=start))).uids


def quit_without_dele(port: int, login: str, password: str) -> int:
    """Log in, look, QUIT: returns how many messages the device was shown."""
    with Pop3Client(port, login, password) as pop:
        count = pop.stat()[0]
        assert pop.quit().startswith(b"+OK")
    return count


# -- a planted record must never make the bridge delete mail ------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("planted", ["unsigned", "signed_for_another_account", "signed_with_another_key"])
def test_a_planted_record_hiding_every_uid_expunges_nothing(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str, planted: str
) -> None:
    uids = seed(mailbox, 10)
    observer = mailbox.observer()
    fields = state_body("default", observer.uidvalidity(), EVERY_UID, FAR_FUTURE)
    if planted == "signed_for_another_account":
        # Another tenant's validly signed record, copied into this mailbox's state folder.
        fields = signed(fields, "someone-else@example.com")
    elif planted == "signed_with_another_key":
        fields = signed(fields, mailbox.user, key="a different key, also 32 characters or more")
    [planted_uid] = plant_state(mailbox, state_message("default", json_body(fields)))
    bridge = bridge_factory(
        upstream={"engine": engine}, delete={"policy": "per-client", "expire_after_days": 30}
    )

    # The device sees its mail, and a QUIT without DELE (expiry runs) removes none of it.
    assert quit_without_dele(bridge.port, mailbox.user, mailbox.password) == 10
    observer.noop()
    assert observer.uids() == uids
    reason = "unsigned" if planted == "unsigned" else "bad_mac"
    wait_for_event(bridge, "device_state_ignored", reason=reason, state_uid=planted_uid)
    assert visible(bridge.port, mailbox.user, mailbox.password) == list(range(1, 11))
    # The record that could not be authenticated is left where it is, not acted on.
    with mailbox.observer(STATE_FOLDER) as state:
        assert planted_uid in state.uids()


def test_a_real_record_copied_from_another_account_is_not_trusted(
    bridge_factory: BridgeFactory, mailbox_factory: Callable[[], Mailbox]
) -> None:
    alice, mallory = mailbox_factory(), mailbox_factory()
    seed(alice, 3)
    seed(mallory, 3)
    bridge = bridge_factory(delete={"policy": "per-client", "expire_after_days": 30})
    # Mallory's phone downloads and deletes everything: her bridge-signed record hides 1:3.
    assert poll(bridge.port, f"{mallory.user}#phone", mallory.password) == [1, 2, 3]
    [record] = state_records(mallory)
    # Put into Alice's state folder (a shared folder, a Sieve rule, +detail delivery...).
    # Both INBOXes may well have the same UIDVALIDITY (made in the same second): then only
    # the account bound into the MAC stands between the copy and Alice's mail.
    [copied] = plant_state(alice, record.raw)
    assert quit_without_dele(bridge.port, f"{alice.user}#phone", alice.password) == 3
    assert alice.observer().uids() == [1, 2, 3]
    wait_for_event(bridge, "device_state_ignored", reason="bad_mac", state_uid=copied)


@pytest.mark.parametrize("engine", ENGINES)
def test_unsigned_records_are_read_for_migration_but_never_cause_deletion(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    """`delete.accept_unsigned_state = true` (upgrading from unsigned records): an unsigned
    record still hides mail from its device, clamped to the messages that exist; it is saved
    again signed at the device's next QUIT; what it hid never counts for expiry, so even the
    worst planted record removes nothing, now or at later QUITs."""
    uids = seed(mailbox, 5)
    observer = mailbox.observer()
    recent = datetime.now(UTC) - timedelta(days=1)
    [old_record] = plant_state(
        mailbox, state_message("phone", json_body(state_body("phone", observer.uidvalidity(), EVERY_UID, recent)))
    )
    bridge = bridge_factory(
        upstream={"engine": engine},
        delete={"policy": "per-client", "expire_after_days": 30, "accept_unsigned_state": True},
    )
    wait_for_event(bridge, "unsigned_state_accepted")
    phone = f"{mailbox.user}#phone"
    assert quit_without_dele(bridge.port, phone, mailbox.password) == 0
    observer.noop()
    assert observer.uids() == uids

    # Saved again, signed; what the unsigned record hid is kept apart, and only what exists.
    [record] = state_records(mailbox)
    assert record.uid != old_record
    assert b'"mac":"' in record.raw
    assert record.hidden == UidRanges()
    assert b'"hidden_unsigned":"1:5"' in record.raw

    # Mail arriving later is not hidden by the old "1:4294967295", and later QUITs (expiry
    # again) still remove nothing the unsigned record hid.
    seed(mailbox, 2, start=6)
    assert visible(bridge.port, phone, mailbox.password) == [6, 7]
    assert quit_without_dele(bridge.port, phone, mailbox.password) == 2
    observer.noop()
    assert len(observer.uids()) == 7
    # The device's own DELEs count as usual: it is the only device, so they expire.
    assert poll(bridge.port, phone, mailbox.password) == [6, 7]
    observer.noop()
    assert observer.uids() == uids


def test_without_migration_an_unsigned_record_makes_its_device_download_again(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 3)
    uidvalidity = mailbox.observer().uidvalidity()
    recent = datetime.now(UTC) - timedelta(hours=1)
    [old_record] = plant_state(
        mailbox, state_message("phone", json_body(state_body("phone", uidvalidity, "1:3", recent)))
    )
    bridge = bridge_factory(delete={"policy": "per-client", "expire_after_days": 30})
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    # The laptop downloads and deletes everything. The phone's unsigned record is not
    # trusted, but the phone was seen recently (its claim can only hold mail back): nothing
    # the phone has not hidden in a signed record is expired.
    assert poll(bridge.port, laptop, mailbox.password) == [1, 2, 3]
    assert len(mailbox.observer().uids()) == 3
    assert visible(bridge.port, phone, mailbox.password) == [1, 2, 3]
    wait_for_event(bridge, "device_state_ignored", reason="unsigned", state_uid=old_record)


# -- crafted records neither crash a session nor stall the others --------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_crafted_records_are_ignored_with_a_warning(
    bridge_factory: BridgeFactory, mailbox: Mailbox, engine: str
) -> None:
    seed(mailbox, 4)
    uidvalidity = mailbox.observer().uidvalidity()
    bridge = bridge_factory(upstream={"engine": engine}, delete={"policy": "per-client", "expire_after_days": 30})
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    # Expiry runs at every QUIT and reads every device's records; the laptop, seen and
    # having hidden nothing, holds all the mail back.
    assert quit_without_dele(bridge.port, laptop, mailbox.password) == 4
    with Pop3Client(bridge.port, phone, mailbox.password) as pop:
        pop.dele(1)
        pop.dele(2)
        assert pop.quit().startswith(b"+OK")
    [own] = [record for record in state_records(mailbox) if record.device == "phone"]

    now = datetime.now(UTC)
    naive = now.replace(tzinfo=None).isoformat()
    crafted = {
        "deeply_nested": state_message("phone", b"[" * 30000 + b"]" * 30000),
        "naive_timestamp": state_message(
            "phone", json_body(signed(state_body("phone", uidvalidity, "3", naive), mailbox.user))
        ),
        # Two million ranges (about 16 MB): only the first 64 KiB are ever fetched.
        "two_million_ranges": state_message(
            "phone",
            json_body(signed(state_body("phone", uidvalidity, ",".join(map(str, range(1, 4_000_000, 2))), now),
                             mailbox.user)),
        ),
        "empty_body": state_message("phone", b""),
        "not_json": state_message("phone", b"\xff\xfe not JSON at all\r\n"),
        "wrong_types": state_message(
            "phone", json_body({**state_body("phone", uidvalidity, "3", now), "uidvalidity": str(uidvalidity)})
        ),
    }
    planted = dict(zip(crafted, plant_state(mailbox, *crafted.values()), strict=True))

    # Logins keep working and the device's own, signed state still applies.
    assert visible(bridge.port, phone, mailbox.password) == [3, 4]
    expected = {
        "deeply_nested": "not_json",
        "naive_timestamp": "bad_timestamp",
        "two_million_ranges": "too_large",
        "not_json": "not_json",
        "wrong_types": "bad_format",
        "empty_body": "not_json",
    }
    for name, reason in expected.items():
        wait_for_event(bridge, "device_state_ignored", reason=reason, state_uid=planted[name])
    assert not any(event.get("event") == "session_crashed" for event in bridge.events())

    # A QUIT saves the device's state (expiry runs too) and replaces only its own record:
    # what could not be read stays untouched, and deletes nothing.
    with Pop3Client(bridge.port, phone, mailbox.password) as pop:
        pop.dele(1)
        assert pop.quit().startswith(b"+OK")
    observer = mailbox.observer()
    assert len(observer.uids()) == 4
    with mailbox.observer(STATE_FOLDER) as state:
        left = state.uids()
    assert own.uid not in left
    assert set(planted.values()) <= set(left)
    assert len(left) == len(planted) + 2  # and the phone's and the laptop's records
    assert visible(bridge.port, phone, mailbox.password) == [4]
    # Another device's login is not disturbed by records claiming to be the phone's.
    assert visible(bridge.port, laptop, mailbox.password) == [1, 2, 3, 4]


def test_a_naive_and_an_aware_timestamp_of_one_device_do_not_break_expiry(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 2)
    uidvalidity = mailbox.observer().uidvalidity()
    now = datetime.now(UTC)
    plant_state(
        mailbox,
        state_message("tablet", json_body(signed(state_body("tablet", uidvalidity, "1", now), mailbox.user))),
        state_message(
            "tablet",
            json_body(signed(state_body("tablet", uidvalidity, "2", now.replace(tzinfo=None)), mailbox.user)),
        ),
    )
    bridge = bridge_factory(delete={"policy": "per-client", "expire_after_days": 30})
    # Expiry (at this QUIT) reads every device's records, the tablet's two included.
    assert poll(bridge.port, f"{mailbox.user}#phone", mailbox.password) == [1, 2]
    wait_for_event(bridge, "device_state_ignored", reason="bad_timestamp")
    # The tablet's readable record hides 1; 2 is still the tablet's to download.
    assert mailbox.observer().uids() == [2]
    assert visible(bridge.port, f"{mailbox.user}#tablet", mailbox.password) == [2]


# -- without UIDPLUS, superseded versions stay \Deleted and must not be read ---------------------


@pytest.mark.parametrize("engine", ENGINES)
async def test_superseded_versions_flagged_deleted_are_not_read(mailbox: Mailbox, engine: str) -> None:
    settings = bridge_settings(mailbox.imap_port, upstream={"engine": engine, "ignore_capabilities": ["UIDPLUS"]})
    uidvalidity = 7
    with trio.fail_after(60):
        async with engine_runtime(engine):
            connection = await open_mailbox(settings.upstream, mailbox.user, mailbox.password)
            try:
                assert "UIDPLUS" not in connection.capabilities
                signer = StateSigner(TEST_STATE_KEY.encode(), mailbox.user)
                store = DeviceStateStore(connection, STATE_FOLDER, "INBOX", signer)
                for uid in (1, 2, 3):
                    state = await store.load("phone", uidvalidity)
                    state.hidden = state.hidden.union(UidRanges.of([uid]))
                    await store.save(state, uidvalidity)
                state = await store.load("phone", uidvalidity)
                # Three versions are in the folder, two of them flagged \Deleted (no UID
                # EXPUNGE without UIDPLUS); only the live one is read.
                assert len(state_records(mailbox)) == 3
                assert len(state.versions) == 1
                assert str(state.hidden) == "1:3"
            finally:
                await connection.aclose()


def test_a_record_flagged_deleted_by_the_owner_no_longer_hides_mail(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    # An IMAP client that "deletes" by flagging (and expunges later, or never): docs/design.md
    # says deleting a device's record makes the device download everything again.
    seed(mailbox, 2)
    bridge = bridge_factory(delete={"policy": "per-client"}, upstream={"ignore_capabilities": ["UIDPLUS"]})
    phone = f"{mailbox.user}#phone"
    assert poll(bridge.port, phone, mailbox.password) == [1, 2]
    seed(mailbox, 1, start=3)
    assert poll(bridge.port, phone, mailbox.password) == [3]
    with mailbox.observer(STATE_FOLDER) as state:
        live = [uid for uid in state.uids() if "\\Deleted" not in state.flags(uid)]
        assert len(live) == 1
        state.store_flags(live, ["\\Deleted"])
    assert visible(bridge.port, phone, mailbox.password) == [1, 2, 3]
