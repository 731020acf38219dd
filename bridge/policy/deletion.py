"""What DELE means upstream: the operator's delete policy, applied at QUIT.

- expunge: `\\Deleted` + `UID EXPUNGE` of the marked UIDs (classic POP3).
- move: the marked messages move to a folder (MOVE, or COPY + delete of exactly them).
- keep: nothing is deleted; the marked messages get `\\Seen`.
- per-client: the marked messages are hidden from this device only, in its state record
  (bridge.policy.device_state); with `expire_after_days`, messages every recently seen device has
  hidden, or older than the limit, are then removed by `expire_action`.

A state record can hide from its device only messages of the session's snapshot, and expiry
only ever removes messages of the snapshot: nothing read back from the state folder can
reach beyond what exists (bridge.policy.device_state says which records are trusted at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import reduce
from typing import Protocol

from bridge.config import BridgeSettings
from bridge.imap import MailboxSnapshot, MaildropStore
from bridge.ops import metrics
from bridge.ops.logs import get_logger
from bridge.policy.device_state import (
    DeviceState,
    DeviceStateStore,
    StateBackend,
    StateChanging,
    StateSigner,
)
from bridge.policy.identity import LoginIdentity
from bridge.policy.uid_ranges import UidRanges
from bridge.policy.windows import apply_window, imap_date
from bridge.uidl.facts import FactsMailbox
from bridge.uidl.memory import UidlMemory
from bridge.uidl.serving import SessionUidls, open_uidls

_log = get_logger()


class MaildropAndFolders(MaildropStore, StateBackend, FactsMailbox, Protocol):
    """The maildrop and the account's other folders (the state folder, the move folder), on
    one upstream connection: what bridge.imap.mailbox.ImapMailbox is."""

def expire_capability(settings: BridgeSettings, identity: LoginIdentity | None) -> str:
    """RFC 2449 EXPIRE: days the server keeps a message after a client leaves it, per user
    once logged in; before login, with USER when accounts may differ."""
    days = settings.delete.expire_after_days

    def value(policy: str) -> str:
        return str(days) if days and policy == "per-client" else "NEVER"

    if identity is not None:
        return f"EXPIRE {value(identity.policy)}"
    per_account = {value(a.policy) for a in settings.delete.accounts.values() if a.policy}
    default = value(settings.delete.policy)
    return f"EXPIRE {default} USER" if per_account - {default} else f"EXPIRE {default}"


@dataclass
class MaildropView:
    """The session's maildrop: the snapshot the device sees, and what is needed at QUIT."""

    identity: LoginIdentity
    snapshot: MailboxSnapshot
    all_uids: tuple[int, ...]
    device_state: DeviceState | None = None
    store: DeviceStateStore | None = field(default=None, repr=False)
    # The UIDLs (bridge.uidl.serving); None: the default format from the snapshot.
    uidls: SessionUidls | None = None


async def open_maildrop(
    mailbox: MaildropAndFolders, identity: LoginIdentity, settings: BridgeSettings, memory: UidlMemory
) -> MaildropView:
    snapshot = await mailbox.snapshot()
    all_uids = snapshot.uids
    uidls = await open_uidls(mailbox, identity.account, settings, memory, snapshot)
    folder = settings.upstream.mailbox
    if identity.policy != "per-client" and identity.first_login != "from-now-on":
        shown = await apply_window(mailbox, folder, snapshot, identity.window, datetime.now(UTC).date())
        return MaildropView(identity, shown, all_uids, uidls=uidls)
    delete = settings.delete
    signer = StateSigner(delete.signing_key, identity.account, accept_unsigned=delete.accept_unsigned_state)
    carry = uidls.carry if uidls is not None else None
    store = DeviceStateStore(mailbox, delete.state_folder, folder, signer, carry)
    state = await store.load(identity.device, snapshot.uidvalidity)
    if identity.first_login == "from-now-on" and not state.versions:
        # The device's first login: everything there now is "before" it (bridge.policy.windows).
        state.hidden = UidRanges.of(all_uids)
        await store.save(state, snapshot.uidvalidity)
        _log.info("device_first_login", device=identity.device, hidden=len(all_uids))
    # Only the snapshot's messages are looked up, however wide the stored ranges are; the
    # save at QUIT keeps only the snapshot's UIDs.
    visible = MailboxSnapshot.of(snapshot.uidvalidity, (info for info in snapshot.messages if not state.hides(info.uid)))
    shown = await apply_window(mailbox, folder, visible, identity.window, datetime.now(UTC).date())
    if identity.policy != "per-client":
        return MaildropView(identity, shown, all_uids, uidls=uidls)
    return MaildropView(identity, shown, all_uids, state, store, uidls)


async def apply_deletions(
    mailbox: MaildropAndFolders, view: MaildropView, marked: list[int], settings: BridgeSettings
) -> None:
    """Apply the session's DELE marks per policy; raises UpstreamError if the server fails."""
    identity = view.identity
    if identity.policy == "expunge":
        await mailbox.delete(marked)
    elif identity.policy == "move":
        await mailbox.move(marked, identity.folder)
    elif identity.policy == "keep":
        await mailbox.add_flags(marked, "\\Seen")
    else:
        await _hide_for_device(mailbox, view, marked, settings)
    if marked:
        _log.info("deletions_applied", count=len(marked), policy=identity.policy)
        metrics.DELETIONS_APPLIED.labels(identity.policy).inc(len(marked))


async def _hide_for_device(
    mailbox: MaildropAndFolders, view: MaildropView, marked: list[int], settings: BridgeSettings
) -> None:
    assert view.store is not None and view.device_state is not None
    expire_days = settings.delete.expire_after_days
    state = view.device_state
    if not marked and not expire_days and not state.needs_signing and not state.carried:
        return  # nothing to record; last_seen only matters for expiry
    state.hidden = state.hidden.union(UidRanges.of(marked))
    state.restrict_to(view.all_uids)
    now = datetime.now(UTC)
    await view.store.save(state, view.snapshot.uidvalidity, now)
    if expire_days:
        await _expire(mailbox, view, settings, now - timedelta(days=expire_days))


async def _expire(mailbox: MaildropAndFolders, view: MaildropView, settings: BridgeSettings, cutoff: datetime) -> None:
    assert view.store is not None
    try:
        states = await view.store.load_all(view.snapshot.uidvalidity)
    except StateChanging:
        # This device's own state is saved; expiry just waits for a calmer QUIT.
        _log.warning("expiry_skipped", reason="state_changing")
        return
    # Only what devices hid in signed records counts (never `hidden_unsigned`); a device
    # known only from a record that could not be verified counts as having hidden nothing.
    active = [s.hidden for s in states.values() if s.last_seen is not None and s.last_seen >= cutoff]
    hidden_by_all = reduce(UidRanges.intersection, active) if active else UidRanges()
    existing = set(view.all_uids)
    old = await mailbox.search(settings.upstream.mailbox, "BEFORE", imap_date(cutoff))
    # Over the snapshot's UIDs only: the ranges may be as wide as a record claims.
    doomed = sorted({uid for uid in view.all_uids if uid in hidden_by_all} | (set(old) & existing))
    if not doomed:
        return
    if settings.delete.expire_action == "move":
        await mailbox.move(doomed, view.identity.folder)
    else:
        await mailbox.delete(doomed)
    _log.info("messages_expired", count=len(doomed), action=settings.delete.expire_action, devices=len(active))
