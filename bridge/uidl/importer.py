"""Importing one account's UIDLs from its old POP3 server (`pop3-imap-bridge uidl import`).

1. Read the old server: UIDL, LIST and `TOP n 0` of every message (bridge.uidl.old_server).
2. Read the IMAP maildrop: UIDs, sizes (the snapshot) and every header (BODY.PEEK[HEADER]).
3. Pair them (bridge.uidl.matching): by the reduced header's digest (bridge.uidl.headers),
   ties broken by the body's size (the size less the header: a header field added on the way
   changes the size, not the body), then by order.
4. Unless this is a dry run, and unless strict mode found an old message without a partner
   (then nothing is recorded for the account), write a UIDL table for the maildrop's
   UIDVALIDITY: each paired IMAP message with the old server's UIDL, in the old server's
   order; it replaces the account's earlier imports for that UIDVALIDITY.

Messages only on the IMAP side (mail that arrived after the copy) are reported and keep the
configured format: to a device they are new mail, as they should be. An old UIDL that is not
1-70 characters of 0x21-0x7E is recorded as its hash form (bridge.uidl.formats.foreign_uidl).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from bridge.config import BridgeSettings
from bridge.imap import MailboxSnapshot
from bridge.imap.engines import open_mailbox
from bridge.imap.mailbox import ImapMailbox
from bridge.uidl.formats import foreign_uidl, uidl_format, unique_uidls
from bridge.uidl.headers import SKIPPED_FIELDS, header_digest, header_length
from bridge.uidl.matching import Candidate, pair
from bridge.uidl.old_server import OldMessage, OldServerAddress, connect
from bridge.uidl.records import RecordSigner, TableRecord
from bridge.uidl.store import UidlStore

_HEADER_BATCH = 500


@dataclass(frozen=True)
class ImportRequest:
    account: str
    password: str
    old_login: str  # the login on the old server (usually the account)
    old_server: OldServerAddress


@dataclass(frozen=True)
class ImportOptions:
    dry_run: bool = False
    lenient: bool = False
    ca_file: str = ""
    verify: bool = True
    allow_plaintext: bool = False
    skipped_fields: frozenset[str] = SKIPPED_FIELDS


@dataclass
class DiffLine:
    """One line of what a device sees change: `-` an old UIDL it no longer sees, `+` a UIDL
    it has not seen (it downloads that message), ` ` unchanged."""

    mark: str
    number: int
    uidl: str


@dataclass
class AccountReport:
    account: str
    matched: int = 0
    only_old: int = 0  # old messages no IMAP message matched
    only_imap: int = 0  # IMAP messages no old message matched (new mail)
    ambiguous: int = 0
    size_differs: int = 0
    recorded: bool = False
    replaced: int = 0  # records of an earlier import replaced
    # "recorded", "dry run", "not recorded" (strict mode, unmatched old messages), "nothing
    # to record" (no pair) or "error".
    outcome: str = "error"
    error: str = ""
    diff: list[DiffLine] = field(default_factory=list)


def old_candidates(messages: Iterable[OldMessage], skipped: frozenset[str]) -> list[Candidate]:
    return [
        Candidate(m.number, header_digest(m.header, skipped), max(m.size - header_length(m.header), 0))
        for m in messages
    ]


def imap_candidates(snapshot: MailboxSnapshot, headers: dict[int, bytes], skipped: frozenset[str]) -> list[Candidate]:
    size_of = dict(zip(snapshot.uids, snapshot.sizes, strict=True))
    return [
        Candidate(uid, header_digest(headers[uid], skipped), max(size_of[uid] - header_length(headers[uid]), 0))
        for uid in snapshot.uids
        if uid in headers
    ]


async def read_imap(mailbox: ImapMailbox) -> tuple[MailboxSnapshot, dict[int, bytes]]:
    snapshot = await mailbox.snapshot()
    headers: dict[int, bytes] = {}
    uids = snapshot.uids
    for start in range(0, len(uids), _HEADER_BATCH):
        headers.update(await mailbox.fetch_headers(uids[start : start + _HEADER_BATCH]))
    return snapshot, headers


def device_diff(
    old: list[OldMessage], table: list[tuple[int, str, int | None]], snapshot: MailboxSnapshot, settings: BridgeSettings
) -> list[DiffLine]:
    """The UIDL listing a device sees on the old server against the one it will see through
    the bridge after the import (recorded UIDLs in the old order, the rest in the format)."""
    before = [foreign_uidl(message.uidl) for message in old]
    recorded = {uid: uidl for uid, uidl, _old in table}
    rank = {uid: index for index, (uid, _uidl, _old) in enumerate(table)}
    uids = list(snapshot.uids)
    slots = [index for index, uid in enumerate(uids) if uid in rank]
    order = list(uids)
    for slot, uid in zip(slots, sorted((uids[i] for i in slots), key=rank.__getitem__), strict=True):
        order[slot] = uid
    uidl = settings.uidl
    if uidl.uses_emailid:
        natural = {uid: "(EMAILID)" for uid in uids}
    else:
        render = uidl_format(uidl.format).render
        natural = {uid: render(uid, snapshot.uidvalidity) for uid in uids}
    after = unique_uidls(order, [recorded.get(uid, natural[uid]) for uid in order], [0 if uid in recorded else 2 for uid in order])
    kept = set(before) & set(after)
    lines = [DiffLine(" " if text in kept else "-", number, text) for number, text in enumerate(before, 1)]
    lines += [DiffLine("+", number, text) for number, text in enumerate(after, 1) if text not in kept]
    return lines


async def import_account(request: ImportRequest, settings: BridgeSettings, options: ImportOptions) -> AccountReport:
    """Import one account (see the module); errors are reported, never raised."""
    report = AccountReport(request.account)
    try:
        old_server = await connect(
            request.old_server, ca_file=options.ca_file, verify=options.verify, allow_plaintext=options.allow_plaintext
        )
        try:
            await old_server.log_in(request.old_login, request.password)
            old = await old_server.messages()
        finally:
            await old_server.aclose()
        mailbox = await open_mailbox(settings.upstream, request.account, request.password)
        try:
            await _match_and_record(mailbox, old, request, settings, options, report)
        finally:
            await mailbox.aclose()
    except Exception as exc:  # one account's failure is reported; the others go on
        report.outcome, report.error = "error", str(exc) or type(exc).__name__
    return report


async def _match_and_record(
    mailbox: ImapMailbox, old: list[OldMessage], request: ImportRequest, settings: BridgeSettings,
    options: ImportOptions, report: AccountReport,
) -> None:
    snapshot, headers = await read_imap(mailbox)
    pairing = pair(old_candidates(old, options.skipped_fields), imap_candidates(snapshot, headers, options.skipped_fields))
    report.matched, report.ambiguous, report.size_differs = len(pairing.pairs), pairing.ambiguous, pairing.size_differs
    report.only_old, report.only_imap = len(pairing.unmatched_old), len(pairing.unmatched_new)
    uidl_of_number = {message.number: message.uidl for message in old}
    table = [(new.ident, foreign_uidl(uidl_of_number[old_c.ident]), None) for old_c, new in pairing.pairs]
    recording = not report.only_old or options.lenient
    report.diff = device_diff(old, table if recording else [], snapshot, settings)
    if not recording:
        report.outcome = "not recorded"
        return
    if not table:
        report.outcome = "nothing to record"
        return
    if options.dry_run:
        report.outcome = "dry run"
        return
    store = UidlStore(
        mailbox, settings.delete.state_folder, settings.upstream.mailbox,
        RecordSigner(settings.delete.signing_key, request.account),
    )
    earlier = await _earlier_tables(store, snapshot.uidvalidity)
    await store.write_table(snapshot.uidvalidity, table, "import", replaces=earlier)
    report.recorded, report.replaced, report.outcome = True, len(earlier), "recorded"


async def _earlier_tables(store: UidlStore, uidvalidity: int) -> list[int]:
    if await store.stamp() is None:
        return []
    found = await store.fetch(await store.record_uids())
    return [item.state_uid for item in found if isinstance(item.record, TableRecord) and item.record.uidvalidity == uidvalidity]
