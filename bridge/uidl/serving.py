"""A session's UIDLs, worked out at login (`open_uidls`) from `[uidl]` and the UIDL records.

Which UIDL a message of the snapshot gets, first match wins:

1. the UIDL table in force (`uidl import`, or a re-match after a UIDVALIDITY change);
2. its X-UIDL field (`reuse_x_uidl`), as a valid UIDL (bridge.uidl.formats.foreign_uidl);
3. the configured format: `format` filled in with its UID and the UIDVALIDITY, or its EMAILID.

Two messages never share one: where they would, the one of the higher rank above (then the
earlier in the maildrop) keeps it and the other gets a hash form. The maildrop's order is UID
order, except that the messages of a table come in the table's order (the old server's) in
the places they occupy: new mail stays at the end.

With the defaults (`format = "dovecot"`, no records) this module is not involved at all: the
session builds today's UIDLs from the snapshot (bridge.session.uidl). With records, a warm
poll of an unchanged maildrop costs one STATUS of the state folder (with `imported`, to see a
new import) or nothing, and reuses what the previous poll worked out (bridge.uidl.memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bridge.config import BridgeSettings, UidlSettings
from bridge.imap import MailboxSnapshot, UpstreamError
from bridge.ops.logs import get_logger
from bridge.policy.device_state import UidCarry
from bridge.pop3 import MessageList
from bridge.uidl.facts import FactsMailbox, learn_new
from bridge.uidl.formats import UidlFormat, foreign_uidl, uidl_format, unique_uidls
from bridge.uidl.memory import MaildropMemory, UidlMemory
from bridge.uidl.records import RecordSigner
from bridge.uidl.rematch import OldUidl, emailid_missing, needs_rematch, rematch
from bridge.uidl.store import UidlStore

_log = get_logger(component="uidl")
# Priorities when two messages would share a UIDL (lower wins).
_RECORDED, _X_UIDL, _NATURAL = 0, 1, 2


class UidlUnavailable(UpstreamError):
    """`format = "emailid"` on a server without OBJECTID (RFC 8474)."""


class SessionUidls:
    """What the session's maildrop is built from (bridge.session.uidl)."""

    carry: UidCarry | None = None

    def message_list(self, snapshot: MailboxSnapshot) -> MessageList:
        raise NotImplementedError


# One function per format object (bridge.uidl.formats.uidl_format hands out one per format).
_FORMATTED: dict[UidlFormat, Callable[[MailboxSnapshot], MessageList]] = {}


def formatted_list(fmt: UidlFormat) -> Callable[[MailboxSnapshot], MessageList]:
    """A snapshot's message list in this format, as one function per format (so
    `MailboxSnapshot.derived` keeps it with the snapshot: a warm poll builds nothing)."""
    found = _FORMATTED.get(fmt)
    if found is None:
        render = fmt.render

        def compute(snapshot: MailboxSnapshot) -> MessageList:
            uidvalidity = snapshot.uidvalidity
            return MessageList(snapshot.sizes, [render(uid, uidvalidity) for uid in snapshot.uids], snapshot.uids)

        found = _FORMATTED[fmt] = compute
    return found


class FormattedUidls(SessionUidls):
    """A format other than the default and no records."""

    def __init__(self, fmt: UidlFormat) -> None:
        self._compute = formatted_list(fmt)

    def message_list(self, snapshot: MailboxSnapshot) -> MessageList:
        return snapshot.derived(self._compute)


@dataclass(frozen=True)
class _Resolved:
    order: tuple[int, ...]
    uidls: tuple[str, ...]
    messages: MessageList


class RecordedUidls(SessionUidls):
    """UIDLs from the records (see the module), for the snapshot taken at login and any
    part of it (a per-client device's view)."""

    def __init__(self, memory: MaildropMemory, settings: UidlSettings, snapshot: MailboxSnapshot) -> None:
        self._memory = memory
        self._settings = settings
        self._snapshot = snapshot
        self._fmt = None if settings.uses_emailid else uidl_format(settings.format)
        current = memory.current if memory.uidvalidity == snapshot.uidvalidity else None
        self.carry = current.carry if current is not None else None

    def _plain(self) -> bool:
        memory = self._memory
        return (
            self._fmt is not None and (memory.current is None or not memory.current.uidl_of)
            and not (self._settings.reuse_x_uidl and memory.x_uidls)
        )

    def message_list(self, snapshot: MailboxSnapshot) -> MessageList:
        if self._plain():
            assert self._fmt is not None
            return snapshot.derived(formatted_list(self._fmt))
        resolved = self._resolved()
        if snapshot is self._snapshot:
            return resolved.messages
        shown = set(snapshot.uids)
        size_of = dict(zip(snapshot.uids, snapshot.sizes, strict=True))
        pairs = [(uid, uidl) for uid, uidl in zip(resolved.order, resolved.uidls, strict=True) if uid in shown]
        return MessageList([size_of[uid] for uid, _ in pairs], [uidl for _, uidl in pairs], [uid for uid, _ in pairs])

    def _resolved(self) -> _Resolved:
        memory, snapshot = self._memory, self._snapshot
        memo = memory.memo
        if memo is not None and memo[0] is snapshot and memo[1] == memory.version:
            return memo[2]  # type: ignore[no-any-return]
        resolved = resolve(snapshot, memory, self._settings, self._fmt)
        memory.memo = (snapshot, memory.version, resolved)
        return resolved


def resolve(snapshot: MailboxSnapshot, memory: MaildropMemory, settings: UidlSettings, fmt: UidlFormat | None) -> _Resolved:
    uids, uidvalidity = snapshot.uids, snapshot.uidvalidity
    current = memory.current if memory.uidvalidity == uidvalidity else None
    uidl_of = current.uidl_of if current is not None else {}
    rank_of = current.rank_of if current is not None else {}
    order = list(uids)
    if rank_of:
        slots = [index for index, uid in enumerate(uids) if uid in rank_of]
        for slot, uid in zip(slots, sorted((uids[i] for i in slots), key=rank_of.__getitem__), strict=True):
            order[slot] = uid
    x_uidls = memory.x_uidls if settings.reuse_x_uidl else {}
    emailids = memory.emailids
    render = fmt.render if fmt is not None else None
    uidls: list[str] = []
    ranks: list[int] = []
    for uid in order:
        if uid in uidl_of:
            uidls.append(uidl_of[uid])
            ranks.append(_RECORDED)
        elif uid in x_uidls:
            uidls.append(x_uidls[uid])
            ranks.append(_X_UIDL)
        elif render is not None:
            uidls.append(render(uid, uidvalidity))
            ranks.append(_NATURAL)
        else:
            emailid = emailids.get(uid)
            uidls.append(foreign_uidl(emailid) if emailid is not None else emailid_missing(uid, uidvalidity))
            ranks.append(_NATURAL)
    unique = unique_uidls(order, uidls, ranks)
    size_of = dict(zip(uids, snapshot.sizes, strict=True))
    messages = MessageList([size_of[uid] for uid in order], unique, order)
    return _Resolved(tuple(order), tuple(unique), messages)


async def open_uidls(
    mailbox: FactsMailbox, account: str, settings: BridgeSettings, memory: UidlMemory, snapshot: MailboxSnapshot
) -> SessionUidls | None:
    """The session's UIDLs for `snapshot` (None: the default format, nothing recorded).
    Raises UpstreamError (UidlUnavailable for "emailid" without OBJECTID)."""
    uidl = settings.uidl
    if uidl.uses_emailid and "OBJECTID" not in mailbox.capabilities:
        _log.error("uidl_emailid_unavailable", note='[uidl] format = "emailid" needs a server with OBJECTID (RFC 8474)')
        raise UidlUnavailable("the server has no EMAILID (OBJECTID)")
    if not uidl.uses_records and not uidl.uses_emailid:
        return None if uidl.format == "dovecot" else FormattedUidls(uidl_format(uidl.format))
    key, entry = memory.entry(account, settings)
    async with entry.lock:
        if uidl.uses_records:
            store = UidlStore(
                mailbox, settings.delete.state_folder, settings.upstream.mailbox,
                RecordSigner(settings.delete.signing_key, account),
            )
            await _read_records(entry, store, snapshot, uidl)
            if uidl.keep_across_uidvalidity and (old := needs_rematch(entry, snapshot.uidvalidity)) is not None:
                render = None if uidl.uses_emailid else uidl_format(uidl.format).render
                await rematch(entry, store, mailbox, snapshot, old, OldUidl(render, uidl.reuse_x_uidl))
                entry.reset()
                await _read_records(entry, store, snapshot, uidl)
            if uidl.keeps_facts:
                await learn_new(entry, store, mailbox, snapshot)
        if uidl.uses_emailid:
            await _learn_emailids(entry, mailbox, snapshot)
        found = RecordedUidls(entry, uidl, snapshot)
    memory.remembered(key, entry)
    return found


async def _read_records(entry: MaildropMemory, store: UidlStore, snapshot: MailboxSnapshot, uidl: UidlSettings) -> None:
    """Bring `entry` up to date with the state folder when it may be stale: never read yet,
    another UIDVALIDITY, or (with `imported`, where an import may come at any time) a state
    folder whose STATUS changed. Only records not read before are fetched."""
    uidvalidity = snapshot.uidvalidity
    if entry.uidvalidity is not None and entry.uidvalidity != uidvalidity:
        entry.reset()
    if entry.loaded and not uidl.imported:
        return
    stamp = await store.stamp()
    if entry.loaded and stamp == entry.stamp:
        return
    if stamp is None:
        entry.reset()
    else:
        present = set(await store.record_uids())
        entry.forget(entry.known - present)
        entry.take(await store.fetch(sorted(present - entry.known)), uidvalidity)
        entry.known = present
    entry.stamp = stamp
    entry.loaded = True
    entry.settle(uidvalidity)


async def _learn_emailids(entry: MaildropMemory, mailbox: FactsMailbox, snapshot: MailboxSnapshot) -> None:
    if entry.uidvalidity != snapshot.uidvalidity:
        entry.emailids.clear()
        entry.uidvalidity = snapshot.uidvalidity
    known = entry.emailids
    missing = [uid for uid in snapshot.uids if uid not in known]
    if missing:
        known.update(await mailbox.fetch_emailids(missing))
        entry.version += 1
