"""When the maildrop's UIDVALIDITY changes: the same messages keep their UIDLs.

A folder deleted and recreated, restored from a backup, reindexed or moved to another server
gets a new UIDVALIDITY, and every UID in it means nothing any more. With
`[uidl] keep_across_uidvalidity` the bridge has fingerprinted every message it listed
(bridge.uidl.facts), so at the first login that sees the new UIDVALIDITY it:

1. fingerprints every message of the maildrop as it is now (one full header read, once);
2. pairs the messages it knew (the most recent old UIDVALIDITY that has facts) with these:
   by EMAILID where both sides have one, then by header digest, sizes breaking ties, then
   UID order (bridge.uidl.matching: identical copies are paired in order);
3. writes a UIDL table for the new UIDVALIDITY: each paired message keeps the UIDL it was
   served with (the old table's, its X-UIDL, or the configured format of its old UID and
   UIDVALIDITY), with its old UID, so per-device state follows it
   (bridge.policy.device_state.UidCarry), in the order the old maildrop showed them;
4. writes the new facts, then expunges the old UIDVALIDITY's records.

The table is written first: a login that finds it knows the work is done. Messages with no
partner get UIDLs of the configured format (new mail, as far as devices can tell). The event
`uidls_rematched` says how many kept their UIDL and how many got new ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from bridge.imap import MailboxSnapshot
from bridge.ops.logs import get_logger
from bridge.uidl.facts import FactsMailbox, fingerprint, save_facts
from bridge.uidl.formats import foreign_uidl
from bridge.uidl.matching import Candidate, pair_in_stages
from bridge.uidl.memory import MaildropMemory, winning_table
from bridge.uidl.records import Fact, FactsRecord
from bridge.uidl.store import UidlStore

_log = get_logger(component="uidl")


def needs_rematch(memory: MaildropMemory, uidvalidity: int) -> int | None:
    """The old UIDVALIDITY to re-match from, or None: nothing of this one is recorded yet
    (no facts, no table written by a re-match) and facts of another one are."""
    if memory.facts_of(uidvalidity) or memory.tables_of(uidvalidity):
        return None  # done already (or an import for this UIDVALIDITY, which wins)
    others = [summary for summary in memory.facts.values() if summary.uidvalidity != uidvalidity]
    if not others:
        return None
    return max(others, key=lambda summary: summary.written).uidvalidity


def _by_emailid(candidate: Candidate) -> Candidate:
    fact = candidate.key
    assert isinstance(fact, Fact)
    return replace(candidate, key=fact.emailid)


def _by_digest(candidate: Candidate) -> Candidate:
    fact = candidate.key
    assert isinstance(fact, Fact)
    return replace(candidate, key=fact.digest)


async def rematch(
    memory: MaildropMemory, store: UidlStore, mailbox: FactsMailbox, snapshot: MailboxSnapshot, old_uidvalidity: int,
    old_uidl: OldUidl,
) -> None:
    """Re-match the maildrop from `old_uidvalidity` (see the module); the records are then
    read again by the caller."""
    uidvalidity = snapshot.uidvalidity
    old_records = sorted(memory.facts_of(old_uidvalidity))
    old_facts: dict[int, Fact] = {}
    for item in await store.fetch(old_records):
        if isinstance(item.record, FactsRecord) and item.record.uidvalidity == old_uidvalidity:
            for fact in item.record.facts:
                old_facts.setdefault(fact.uid, fact)
    old_table = winning_table(memory.tables, old_uidvalidity)
    rank_of = old_table.rank_of if old_table is not None else {}
    served = {
        uid: old_table.uidl_of[uid] if old_table is not None and uid in old_table.uidl_of else old_uidl(fact, old_uidvalidity)
        for uid, fact in old_facts.items()
    }
    # The old maildrop's order: the table's, then UID order.
    ordered = sorted(old_facts.values(), key=lambda fact: (rank_of.get(fact.uid, len(rank_of)), fact.uid))
    new_facts = await fingerprint(mailbox, snapshot.uids, snapshot)
    # Candidates carry the fact itself as key; each stage re-keys them.
    pairing = pair_in_stages(
        [Candidate(fact.uid, fact, fact.size) for fact in ordered],
        [Candidate(fact.uid, fact, fact.size) for fact in new_facts],
        [_by_emailid, _by_digest],
    )
    entries = [(new.ident, served[old.ident], old.ident) for old, new in pairing.pairs]
    table_uids = memory.tables_of(uidvalidity)
    await store.write_table(uidvalidity, entries, "rematch", replaces=table_uids, from_uidvalidity=old_uidvalidity)
    if snapshot.uids:
        await save_facts(memory, store, uidvalidity, new_facts, snapshot.uids[-1])
    await store.delete(sorted(set(old_records) | set(memory.tables_of(old_uidvalidity))))
    _log.info(
        "uidls_rematched", old_uidvalidity=old_uidvalidity, uidvalidity=uidvalidity, rematched=len(pairing.pairs),
        new_uidls=len(pairing.unmatched_new), gone=len(pairing.unmatched_old), ambiguous=pairing.ambiguous,
    )


class OldUidl:
    """The UIDL a message was served with under the old UIDVALIDITY when no table said
    otherwise: its X-UIDL (with `reuse_x_uidl`), else the configured format (its EMAILID for
    "emailid")."""

    def __init__(self, render: Callable[[int, int], str] | None, reuse_x_uidl: bool) -> None:
        self._render = render
        self._reuse_x_uidl = reuse_x_uidl

    def __call__(self, fact: Fact, uidvalidity: int) -> str:
        if self._reuse_x_uidl and fact.x_uidl is not None:
            return fact.x_uidl
        if self._render is None:
            return foreign_uidl(fact.emailid) if fact.emailid is not None else emailid_missing(fact.uid, uidvalidity)
        return self._render(fact.uid, uidvalidity)


def emailid_missing(uid: int, uidvalidity: int) -> str:
    """The UIDL of a message whose EMAILID the server did not give (expunged meanwhile)."""
    return foreign_uidl(f"no emailid {uid} {uidvalidity}".encode())
