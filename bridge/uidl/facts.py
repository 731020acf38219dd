"""Fingerprints of the maildrop's messages, learnt for new UIDs only and kept in the state folder.

With `[uidl] keep_across_uidvalidity` or `reuse_x_uidl`, each message the bridge lists is
looked at once: its header is read (BODY.PEEK[HEADER], in batches) for the digest and the
X-UIDL field, and its EMAILID where the server has OBJECTID. The facts go into one record per
login that found new mail (bridge.uidl.records), and every record says up to which UID the
maildrop was looked at, so the next login starts where the last one stopped: a poll that finds
no new mail reads nothing. Small records are merged once there are COMPACT_AFTER of them,
keeping only messages still in the maildrop.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from bridge.imap import MailboxSnapshot
from bridge.uidl.formats import foreign_uidl
from bridge.uidl.headers import FINGERPRINT_BYTES, header_digest, x_uidl
from bridge.uidl.memory import MaildropMemory
from bridge.uidl.records import Fact, FactsRecord, split_facts
from bridge.uidl.store import UidlBackend, UidlStore

# Headers read per FETCH: bounds what one round trip brings back (at most 256 KiB each,
# about 1-3 KiB usually).
HEADER_BATCH = 500
# Facts records of fewer entries than this count as small ...
SMALL_RECORD = 1000
# ... and this many small ones are merged into one.
COMPACT_AFTER = 16


class FactsMailbox(UidlBackend, Protocol):
    @property
    def capabilities(self) -> frozenset[str]: ...
    async def fetch_headers(self, uids: Sequence[int]) -> dict[int, bytes]: ...
    async def fetch_emailids(self, uids: Sequence[int]) -> dict[int, str]: ...


async def fingerprint(mailbox: FactsMailbox, uids: Sequence[int], snapshot: MailboxSnapshot) -> list[Fact]:
    """The facts of these maildrop messages (a message expunged meanwhile is left out)."""
    size_of = dict(zip(snapshot.uids, snapshot.sizes, strict=True))
    with_emailid = "OBJECTID" in mailbox.capabilities
    facts: list[Fact] = []
    for start in range(0, len(uids), HEADER_BATCH):
        batch = uids[start : start + HEADER_BATCH]
        headers = await mailbox.fetch_headers(batch)
        emailids = await mailbox.fetch_emailids(batch) if with_emailid else {}
        for uid in batch:
            header = headers.get(uid)
            if header is None:
                continue
            raw = x_uidl(header)
            facts.append(
                Fact(
                    uid, size_of[uid], header_digest(header)[:FINGERPRINT_BYTES], emailids.get(uid),
                    foreign_uidl(raw) if raw is not None else None,
                )
            )
    return facts


async def save_facts(
    memory: MaildropMemory, store: UidlStore, uidvalidity: int, facts: list[Fact], through: int,
    replaces: Sequence[int] = (),
) -> None:
    """Write facts (as many records as they need), remember each record with its state UID
    when the server says it, then expunge the records they `replace` (a merge)."""
    stamp = memory.stamp
    for run in split_facts(store.mailbox, facts):
        appended = await store.write_facts(uidvalidity, run, through)
        record = FactsRecord(store.mailbox, uidvalidity, through, tuple(run), datetime.now(UTC))
        memory.learn(appended[1] if appended is not None else None, record, uidvalidity)
        stamp = stamp.after_append(appended) if stamp is not None else None
    if replaces:
        await store.delete(replaces)
        memory.forget(set(replaces))
        stamp = None  # what the expunge did to the folder's STATUS is not known for sure
    memory.stamp = stamp


async def learn_new(memory: MaildropMemory, store: UidlStore, mailbox: FactsMailbox, snapshot: MailboxSnapshot) -> None:
    """Fingerprint the messages past `facts_through` and record them; merge small records."""
    uids = snapshot.uids
    new = uids[bisect_right(uids, memory.facts_through) :]
    if new:
        facts = await fingerprint(mailbox, new, snapshot)
        await save_facts(memory, store, snapshot.uidvalidity, facts, new[-1])
    small = [uid for uid, summary in memory.facts_of(snapshot.uidvalidity).items() if summary.count < SMALL_RECORD]
    if len(small) >= COMPACT_AFTER:
        await _merge(memory, store, snapshot, small)


async def _merge(memory: MaildropMemory, store: UidlStore, snapshot: MailboxSnapshot, state_uids: list[int]) -> None:
    live = set(snapshot.uids)
    merged: dict[int, Fact] = {}
    through = 0
    read: list[int] = []
    for item in await store.fetch(state_uids):
        record = item.record
        if not isinstance(record, FactsRecord) or record.uidvalidity != snapshot.uidvalidity:
            continue
        read.append(item.state_uid)
        through = max(through, record.through)
        for fact in record.facts:
            if fact.uid in live:
                merged.setdefault(fact.uid, fact)
    if read:
        await save_facts(memory, store, snapshot.uidvalidity, sorted(merged.values(), key=lambda f: f.uid), through, read)
    # Records that vanished meanwhile were merged by another writer.
    memory.forget(set(state_uids) - set(read))
