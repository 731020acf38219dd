"""Per-device state of the per-client policy, kept in the mailbox itself: it survives
restarts, two bridge processes never lose each other's deletions, it stays compact, it is
reset when the maildrop's UIDVALIDITY changes, and POP3 never shows it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import structlog
import trio

from bridge.imap.engines import engine_runtime, open_mailbox
from bridge.imap.mailbox import ImapMailbox
from bridge.policy.deletion import MaildropView, apply_deletions
from bridge.policy.device_state import DeviceStateStore, StateBackend, StateChanging, StateSigner
from bridge.policy.identity import resolve_login
from bridge.policy.uid_ranges import UidRanges
from sandbox import DovecotSandbox, Mailbox, numbered_messages
from tests.harness import (
    ENGINES,
    TEST_STATE_KEY,
    RawPop3,
    SubprocessBridge,
    ThreadedBridge,
    bridge_settings,
    wait_for_event,
)
from tests.integration.policy_support import (
    STATE_FOLDER,
    create_folder,
    folder_names,
    hidden_for,
    listing,
    poll,
    state_records,
    visible,
)

BridgeFactory = Callable[..., ThreadedBridge]
PER_CLIENT = {"policy": "per-client"}


def seed(box: Mailbox, count: int, start: int = 1, folder: str = "INBOX") -> list[int]:
    return box.append(list(numbered_messages(count, start=start)), mailbox=folder).uids


def test_state_survives_a_bridge_restart(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    seed(mailbox, 3)
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    first = bridge_factory(delete=PER_CLIENT)
    uidls = dict(listing(first.port, phone, mailbox.password))
    with RawPop3("127.0.0.1", first.port) as pop:
        pop.login(phone, mailbox.password)
        assert pop.command(b"DELE 1").startswith(b"+OK")
        assert pop.command(b"DELE 2").startswith(b"+OK")
        assert pop.command(b"QUIT").startswith(b"+OK")
    first.stop()

    second = bridge_factory(delete=PER_CLIENT)
    assert listing(second.port, phone, mailbox.password) == [(3, uidls[3])]
    assert dict(listing(second.port, laptop, mailbox.password)) == uidls


def test_state_is_compact_uid_ranges(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    uids = seed(mailbox, 1000)
    bridge = bridge_factory(delete=PER_CLIENT)
    phone = f"{mailbox.user}#phone"
    with RawPop3("127.0.0.1", bridge.port) as pop:
        pop.login(phone, mailbox.password)
        # Download and delete in order, pipelined as RFC 2449 allows.
        pop.send(b"".join(b"RETR %d\r\nDELE %d\r\n" % (n, n) for n in range(1, 1001)))
        for _ in range(1000):
            assert pop.multiline()[0].startswith(b"+OK")
            assert pop.status().startswith(b"+OK")
        assert pop.command(b"QUIT").startswith(b"+OK")

    records = state_records(mailbox)
    assert [(r.device, r.header_device, r.mailbox) for r in records] == [("phone", "phone", "INBOX")]
    assert records[0].hidden == UidRanges([(uids[0], uids[-1])])
    assert records[0].hidden.range_count == 1
    assert b'"hidden":"1:1000"' in records[0].raw

    more = seed(mailbox, 5, start=1001)
    assert poll(bridge.port, phone, mailbox.password) == [1001, 1002, 1003, 1004, 1005]
    records = state_records(mailbox)
    assert len(records) == 1, "the previous version was replaced"
    assert str(records[0].hidden) == f"{uids[0]}:{more[-1]}"


def test_state_folder_is_never_part_of_the_pop3_maildrop(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 3)
    bridge = bridge_factory(delete={**PER_CLIENT, "state_folder": "Bridge.Devices"})
    for device in ("phone", "laptop"):
        assert poll(bridge.port, f"{mailbox.user}#{device}", mailbox.password) == [1, 2, 3]
    assert {r.device for r in state_records(mailbox, "Bridge.Devices")} == {"phone", "laptop"}
    assert STATE_FOLDER not in folder_names(mailbox)

    seed(mailbox, 2, start=4)
    observer = mailbox.observer()
    inbox = observer.messages()
    uidvalidity = observer.uidvalidity()
    for login in (mailbox.user, f"{mailbox.user}#tablet"):
        with RawPop3("127.0.0.1", bridge.port) as pop:
            pop.login(login, mailbox.password)
            assert pop.command(b"STAT") == b"+OK %d %d\r\n" % (len(inbox), sum(m.size for m in inbox))
            listed = pop.command_multiline(b"LIST")[1]
            assert listed == b"".join(b"%d %d\r\n" % (n, m.size) for n, m in enumerate(inbox, 1)) + b".\r\n"
            uidl = pop.command_multiline(b"UIDL")[1]
            assert uidl == b"".join(
                b"%d %08x%08x\r\n" % (n, m.uid, uidvalidity) for n, m in enumerate(inbox, 1)
            ) + b".\r\n"
            assert pop.command(b"QUIT").startswith(b"+OK")
    assert visible(bridge.port, f"{mailbox.user}#phone", mailbox.password) == [4, 5]


def test_foreign_messages_in_the_state_folder_are_left_alone(
    bridge_factory: BridgeFactory, mailbox: Mailbox
) -> None:
    seed(mailbox, 2)
    create_folder(mailbox, STATE_FOLDER)
    stray = b"Subject: filed here by an IMAP user\r\nX-Pop3-Bridge-Device: phone\r\n\r\nnot JSON\r\n"
    seed_stray = mailbox.append([stray], mailbox=STATE_FOLDER).uids
    bridge = bridge_factory(delete=PER_CLIENT)
    phone = f"{mailbox.user}#phone"
    assert poll(bridge.port, phone, mailbox.password) == [1, 2]
    assert poll(bridge.port, phone, mailbox.password) == []
    with mailbox.observer(STATE_FOLDER) as observer:
        assert observer.fetch(seed_stray[0]) == stray
        assert len(observer.uids()) == 2  # the stray message and phone's one record


@pytest.mark.parametrize("park_seconds", [0, 1200], ids=["fresh-connections", "parked-connections"])
def test_uidvalidity_change_resets_the_state_with_a_warning(
    bridge_factory: BridgeFactory, mailbox: Mailbox, park_seconds: int
) -> None:
    create_folder(mailbox, "Work")
    seed(mailbox, 3, folder="Work")
    seed(mailbox, 1, start=100)  # INBOX is not the maildrop here
    # Parked upstream connections (the default) must notice the new folder as well as
    # sessions that log in afresh.
    bridge = bridge_factory(
        upstream={"mailbox": "Work"}, delete=PER_CLIENT, pool={"park_seconds": park_seconds}
    )
    phone = f"{mailbox.user}#phone"
    assert poll(bridge.port, phone, mailbox.password) == [1, 2, 3]
    assert visible(bridge.port, phone, mailbox.password) == []
    [old_record] = state_records(mailbox)
    assert (old_record.mailbox, str(old_record.hidden)) == ("Work", "1:3")

    # The mailbox owner deletes the folder and makes a new one of the same name.
    with mailbox.observer() as observer:
        assert observer.imap.delete("Work")[0] == "OK"
        assert observer.imap.create("Work")[0] == "OK"
    new_uids = seed(mailbox, 3, start=11, folder="Work")
    assert new_uids == [1, 2, 3], "the same UIDs now name other messages"
    with mailbox.observer("Work") as work:
        new_uidvalidity = work.uidvalidity()
    assert new_uidvalidity != old_record.uidvalidity

    assert visible(bridge.port, phone, mailbox.password) == [11, 12, 13]
    warning = wait_for_event(bridge, "device_state_reset", device="phone")
    assert warning["level"] == "warning"
    assert (warning["stored_uidvalidity"], warning["uidvalidity"]) == (old_record.uidvalidity, new_uidvalidity)

    assert poll(bridge.port, phone, mailbox.password) == [11, 12, 13]
    assert visible(bridge.port, phone, mailbox.password) == []
    [record] = state_records(mailbox)
    assert (record.uidvalidity, str(record.hidden)) == (new_uidvalidity, "1:3")


# -- two bridge processes on one mailbox ----------------------------------------------------


def _two_bridges(
    tmp_path: Path, dovecot: DovecotSandbox, engine: str = "trio"
) -> tuple[SubprocessBridge, SubprocessBridge]:
    made = []
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        made.append(
            SubprocessBridge(
                workdir,
                dovecot.imap_port,
                '[delete]\npolicy = "per-client"\n',
                env={"BRIDGE_UPSTREAM__ENGINE": engine},
            )
        )
    return made[0], made[1]


def _open(port: int, login: str, password: str) -> RawPop3:
    pop = RawPop3("127.0.0.1", port)
    pop.login(login, password)
    return pop


def _quit_together(sessions: Sequence[RawPop3]) -> list[bytes]:
    # Both QUITs are on the wire before either bridge has answered.
    for pop in sessions:
        pop.send(b"QUIT\r\n")
    return [pop.status() for pop in sessions]


@pytest.mark.parametrize("engine", ENGINES)
def test_two_bridges_quitting_the_same_device_at_once_lose_no_deletion(
    tmp_path: Path, dovecot: DovecotSandbox, mailbox: Mailbox, engine: str
) -> None:
    phone = f"{mailbox.user}#phone"
    first, second = _two_bridges(tmp_path, dovecot, engine)
    with first, second:
        hidden: set[int] = set()
        for round_ in range(4):
            base = 10 * round_
            seed(mailbox, 4, start=base + 1)
            sessions = [_open(first.port, phone, mailbox.password), _open(second.port, phone, mailbox.password)]
            try:
                counts = [pop.command(b"STAT").split()[1] for pop in sessions]
                assert counts[0] == counts[1] == b"4"
                # Each session deletes other messages: the first two, the last two.
                for pop, numbers in zip(sessions, ([1, 2], [3, 4]), strict=True):
                    for number in numbers:
                        assert pop.command(b"DELE %d" % number).startswith(b"+OK")
                assert all(reply.startswith(b"+OK") for reply in _quit_together(sessions))
            finally:
                for pop in sessions:
                    pop.close()
            hidden |= {base + 1, base + 2, base + 3, base + 4}
            # The union of both sessions' deletions is hidden, through either bridge.
            assert visible(first.port, phone, mailbox.password) == []
            assert visible(second.port, phone, mailbox.password) == []
        assert visible(first.port, f"{mailbox.user}#laptop", mailbox.password) == sorted(hidden)
        assert len(mailbox.observer().uids()) == 16

        # The racing writers left a version each; the next save folds them into one.
        assert len(state_records(mailbox)) == 2
        assert poll(first.port, phone, mailbox.password) == []
        seed(mailbox, 1, start=99)
        assert poll(second.port, phone, mailbox.password) == [99]
        assert len(state_records(mailbox)) == 1
        assert len(hidden_for(mailbox, "phone")) == 17


def test_two_bridges_quitting_different_devices_at_once(
    tmp_path: Path, dovecot: DovecotSandbox, mailbox: Mailbox
) -> None:
    phone, laptop = f"{mailbox.user}#phone", f"{mailbox.user}#laptop"
    seed(mailbox, 4)
    first, second = _two_bridges(tmp_path, dovecot)
    with first, second:
        sessions = [_open(first.port, phone, mailbox.password), _open(second.port, laptop, mailbox.password)]
        try:
            assert sessions[0].command(b"DELE 1").startswith(b"+OK")
            assert sessions[0].command(b"DELE 2").startswith(b"+OK")
            assert sessions[1].command(b"DELE 4").startswith(b"+OK")
            assert all(reply.startswith(b"+OK") for reply in _quit_together(sessions))
        finally:
            for pop in sessions:
                pop.close()
        assert visible(second.port, phone, mailbox.password) == [3, 4]
        assert visible(first.port, laptop, mailbox.password) == [1, 2, 3]
        assert sorted(r.device for r in state_records(mailbox)) == ["laptop", "phone"]
    assert len(mailbox.observer().uids()) == 4


# -- the store itself, on real IMAP connections ------------------------------------------------


class _SaveBeforeFetch:
    """A real upstream connection during whose reads another bridge saves the same device:
    SEARCH has listed a version that is expunged before FETCH gets to it."""

    def __init__(self, mailbox: ImapMailbox, interfere: Callable[[], object], times: int) -> None:
        self._mailbox = mailbox
        self._interfere = interfere
        self.times_left = times

    async def ensure_folder(self, folder: str) -> None:
        await self._mailbox.ensure_folder(folder)

    async def append(self, folder: str, message: bytes) -> None:
        await self._mailbox.append(folder, message)

    async def search(self, folder: str, *criteria: str) -> list[int]:
        return await self._mailbox.search(folder, *criteria)

    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]:
        if self.times_left:
            self.times_left -= 1
            await self._interfere()  # type: ignore[misc]
        return await self._mailbox.fetch_texts(folder, uids)

    async def delete_in(self, folder: str, uids: Sequence[int]) -> None:
        await self._mailbox.delete_in(folder, uids)


def _store(backend: StateBackend, box: Mailbox) -> DeviceStateStore:
    return DeviceStateStore(backend, STATE_FOLDER, "INBOX", StateSigner(TEST_STATE_KEY.encode(), box.user))


async def _connections(box: Mailbox, count: int, engine: str) -> list[ImapMailbox]:
    settings = bridge_settings(box.imap_port, upstream={"engine": engine}).upstream
    return [await open_mailbox(settings, box.user, box.password) for _ in range(count)]


@pytest.mark.parametrize("engine", ENGINES)
async def test_store_merges_versions_written_concurrently(mailbox: Mailbox, engine: str) -> None:
    with trio.fail_after(60):
        async with engine_runtime(engine):
            one, two = await _connections(mailbox, 2, engine)
            try:
                first = _store(one, mailbox)
                second = _store(two, mailbox)
                a, b = await first.load("phone", 7), await second.load("phone", 7)
                a.hidden, b.hidden = UidRanges.of([1, 2]), UidRanges.of([5])
                await first.save(a, 7)
                await second.save(b, 7)
                assert len(state_records(mailbox)) == 2  # one version per writer

                merged = await first.load("phone", 7)
                assert str(merged.hidden) == "1:2,5"
                assert len(merged.versions) == 2
                await first.save(merged, 7)
                [record] = state_records(mailbox)
                assert str(record.hidden) == "1:2,5"
                assert (await second.load("laptop", 7)).hidden == UidRanges()
            finally:
                for connection in (one, two):
                    await connection.aclose()


@pytest.mark.parametrize("engine", ENGINES)
async def test_store_reads_again_when_a_version_is_replaced_mid_read(mailbox: Mailbox, engine: str) -> None:
    with trio.fail_after(60):
        async with engine_runtime(engine):
            one, two = await _connections(mailbox, 2, engine)
            try:
                other = _store(two, mailbox)
                start = await other.load("phone", 7)
                start.hidden = UidRanges.of([1])
                await other.save(start, 7)
                laptop = await other.load("laptop", 7)
                laptop.hidden = UidRanges.of([9])
                await other.save(laptop, 7)
                added = iter([2, 3, 4, 5, 6, 7])

                async def other_bridge_saves_phone() -> None:
                    state = await other.load("phone", 7)
                    state.hidden = state.hidden.union(UidRanges.of([next(added)]))
                    await other.save(state, 7)

                once = _SaveBeforeFetch(one, other_bridge_saves_phone, times=1)
                states = await _store(once, mailbox).load_all(7)
                assert once.times_left == 0
                # Neither the replaced version's UIDs nor the device itself went missing.
                assert str(states["phone"].hidden) == "1:2"
                assert str(states["laptop"].hidden) == "9"

                always = _SaveBeforeFetch(one, other_bridge_saves_phone, times=100)
                with pytest.raises(StateChanging):
                    await _store(always, mailbox).load("phone", 7)
            finally:
                for connection in (one, two):
                    await connection.aclose()


@pytest.mark.parametrize("engine", ENGINES)
async def test_expiry_waits_for_a_calmer_quit_when_states_keep_changing(mailbox: Mailbox, engine: str) -> None:
    """Expiry reads every device's state; when other bridges keep replacing versions while it
    reads, it is skipped (expiry_skipped), the device's own deletions are saved anyway, and
    nothing is removed on a guess."""
    seed(mailbox, 3)
    settings = bridge_settings(mailbox.imap_port, upstream={"engine": engine}, delete={**PER_CLIENT, "expire_after_days": 1})
    with trio.fail_after(60):
        async with engine_runtime(engine):
            one, two = await _connections(mailbox, 2, engine)
            try:
                other = _store(two, mailbox)

                async def another_bridge_saves_laptop() -> None:
                    state = await other.load("laptop", snapshot.uidvalidity)
                    state.hidden = state.hidden.union(UidRanges.of([3]))
                    await other.save(state, snapshot.uidvalidity)

                snapshot = await one.snapshot()
                await another_bridge_saves_laptop()
                backend = _SaveBeforeFetch(one, another_bridge_saves_laptop, times=0)
                store = _store(backend, mailbox)
                identity = resolve_login(f"{mailbox.user}#phone", settings.delete)
                view = MaildropView(identity, snapshot, snapshot.uids, await store.load("phone", snapshot.uidvalidity), store)
                backend.times_left = 100  # from now on every read races another save
                with structlog.testing.capture_logs() as logged:
                    await apply_deletions(one, view, [snapshot.uids[0]], settings)
                assert [e["reason"] for e in logged if e["event"] == "expiry_skipped"] == ["state_changing"]
                assert not [e for e in logged if e["event"] == "messages_expired"]
            finally:
                for connection in (one, two):
                    await connection.aclose()
    assert len(mailbox.observer().uids()) == 3
    assert hidden_for(mailbox, "phone") == UidRanges.of([snapshot.uids[0]])


def test_records_of_other_maildrops_are_kept_apart(bridge_factory: BridgeFactory, mailbox: Mailbox) -> None:
    create_folder(mailbox, "Work")
    seed(mailbox, 2)
    seed(mailbox, 2, start=50, folder="Work")
    inbox_bridge = bridge_factory(delete=PER_CLIENT)
    phone = f"{mailbox.user}#phone"
    assert poll(inbox_bridge.port, phone, mailbox.password) == [1, 2]
    inbox_bridge.stop()
    work_bridge = bridge_factory(delete=PER_CLIENT, upstream={"mailbox": "Work"})
    # Same device, same UIDs, another folder: nothing hidden there.
    assert visible(work_bridge.port, phone, mailbox.password) == [50, 51]
    assert poll(work_bridge.port, phone, mailbox.password) == [50, 51]
    assert sorted(r.mailbox for r in state_records(mailbox)) == ["INBOX", "Work"]
    assert not any(e["event"] == "device_state_reset" for e in work_bridge.events())


@pytest.mark.parametrize("engine", ENGINES)
async def test_a_state_too_big_for_one_record_is_saved_as_several(mailbox: Mailbox, engine: str) -> None:
    # Every other UID of 60,000: 30,000 ranges, more than one record may hold (records are
    # read only up to 64 KiB and 10,000 ranges). The parts are read back as one state.
    hidden = UidRanges.of(range(1, 60001, 2))
    with trio.fail_after(60):
        async with engine_runtime(engine):
            [connection] = await _connections(mailbox, 1, engine)
            try:
                store = _store(connection, mailbox)
                state = await store.load("phone", 7)
                state.hidden = hidden
                await store.save(state, 7)
                records = state_records(mailbox)
                assert len(records) > 2
                assert all(len(r.raw.partition(b"\r\n\r\n")[2]) < 65536 for r in records)

                state = await store.load("phone", 7)
                assert state.hidden == hidden
                assert len(state.versions) == len(records)
                state.hidden = state.hidden.union(UidRanges.of([60002]))
                await store.save(state, 7)
                # The parts read are replaced by the new parts.
                assert {r.uid for r in state_records(mailbox)}.isdisjoint(r.uid for r in records)
                assert (await store.load("phone", 7)).hidden == hidden.union(UidRanges.of([60002]))
            finally:
                await connection.aclose()
