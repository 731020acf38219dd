"""What one bridge process remembers of each maildrop's UIDL records between logins.

Reading the state folder means selecting it, which costs the connection its warm listing;
fingerprinting means reading headers. So a process remembers, per account and maildrop, the
records it has read (by their UID in the state folder, so only new ones are fetched), the
UIDL table in force, how far the maildrop's messages have been fingerprinted (`facts_through`)
and the X-UIDL values and EMAILIDs serving needs. A warm poll of an unchanged maildrop then
touches neither the state folder nor the headers.

It is a cache, never the truth: a process that forgets (restart, eviction) reads the records
again. Bounded: at most MAX_MAILDROPS maildrops and about MAX_WEIGHT remembered UIDs in all,
the least recently used forgotten first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

import trio

from bridge.config import BridgeSettings, account_key
from bridge.policy.device_state import UidCarry
from bridge.uidl.records import FactsRecord, TableRecord
from bridge.uidl.store import FolderStamp, Stored

MAX_MAILDROPS = 10_000
MAX_WEIGHT = 2_000_000


@dataclass(frozen=True)
class FactsSummary:
    """One facts record, as much of it as is kept in memory."""

    uidvalidity: int
    through: int
    count: int
    written: str


@dataclass(frozen=True)
class CurrentTable:
    """The UIDL table in force for the maildrop's UIDVALIDITY (its newest complete version)."""

    uidl_of: dict[int, str]
    rank_of: dict[int, int]
    carry: UidCarry | None


class MaildropMemory:
    def __init__(self) -> None:
        self.lock = trio.Lock()
        # Bumped whenever the UIDLs it gives could change: what was worked out from it
        # before (`memo`) is then stale.
        self.version = 0
        self.memo: tuple[Any, int, Any] | None = None
        self.reset()

    def reset(self) -> None:
        self.loaded = False
        self.stamp: FolderStamp | None = None
        self.uidvalidity: int | None = None
        self.known: set[int] = set()
        self.tables: dict[int, TableRecord] = {}
        self.facts: dict[int, FactsSummary] = {}
        self.x_uidls: dict[int, str] = {}
        self.emailids: dict[int, str] = {}
        self.facts_through = 0
        self.current: CurrentTable | None = None
        self.version += 1

    @property
    def weight(self) -> int:
        table = len(self.current.uidl_of) if self.current else 0
        return 1 + table + len(self.x_uidls) + len(self.emailids)

    def take(self, stored: list[Stored], uidvalidity: int) -> None:
        """Records read (or written) by this process: tables kept whole, facts summed up, and
        of the maildrop's UIDVALIDITY their X-UIDL values and EMAILIDs."""
        for item in stored:
            record = item.record
            self.known.add(item.state_uid)
            if isinstance(record, TableRecord):
                self.tables[item.state_uid] = record
                continue
            self.learn(item.state_uid, record, uidvalidity)

    def learn(self, state_uid: int | None, record: FactsRecord, uidvalidity: int) -> None:
        if state_uid is not None:
            self.known.add(state_uid)
            self.facts[state_uid] = FactsSummary(
                record.uidvalidity, record.through, len(record.facts), record.written.isoformat()
            )
        if record.uidvalidity != uidvalidity:
            return
        self.facts_through = max(self.facts_through, record.through)
        changed = False
        for fact in record.facts:
            if fact.x_uidl is not None and self.x_uidls.get(fact.uid) != fact.x_uidl:
                self.x_uidls[fact.uid] = fact.x_uidl
                changed = True
            if fact.emailid is not None and self.emailids.get(fact.uid) != fact.emailid:
                self.emailids[fact.uid] = fact.emailid
                changed = True
        if changed:
            self.version += 1

    def forget(self, state_uids: set[int]) -> None:
        """Records that are gone from the state folder (replaced, merged, removed)."""
        for uid in state_uids:
            self.known.discard(uid)
            self.tables.pop(uid, None)
            self.facts.pop(uid, None)

    def settle(self, uidvalidity: int) -> None:
        """Works out the table in force for `uidvalidity` from the tables known."""
        table = winning_table(self.tables, uidvalidity)
        if table != self.current:
            self.current = table
            self.version += 1
        self.uidvalidity = uidvalidity

    def facts_of(self, uidvalidity: int) -> dict[int, FactsSummary]:
        return {uid: summary for uid, summary in self.facts.items() if summary.uidvalidity == uidvalidity}

    def tables_of(self, uidvalidity: int) -> list[int]:
        return [uid for uid, record in self.tables.items() if record.uidvalidity == uidvalidity]


def winning_table(tables: dict[int, TableRecord], uidvalidity: int) -> CurrentTable | None:
    """The newest complete version among the tables of `uidvalidity`."""
    versions: dict[str, dict[int, tuple[int, TableRecord]]] = defaultdict(dict)
    for state_uid, record in tables.items():
        if record.uidvalidity == uidvalidity:
            versions[record.version][record.part] = (state_uid, record)
    complete = [
        version for version, parts in versions.items()
        if len({record.parts for _uid, record in parts.values()}) == 1
        and set(parts) == set(range(1, next(iter(parts.values()))[1].parts + 1))
    ]
    if not complete:
        return None
    parts = versions[max(complete)]
    uidl_of: dict[int, str] = {}
    rank_of: dict[int, int] = {}
    carried: dict[int, int] = {}
    source: int | None = None
    for number in sorted(parts):
        _state_uid, record = parts[number]
        source = record.from_uidvalidity
        for uid, uidl, old in record.entries:
            if uid in uidl_of:
                continue
            uidl_of[uid] = uidl
            rank_of[uid] = len(rank_of)
            if old is not None:
                carried[old] = uid
    carry = UidCarry(source, carried) if source is not None else None
    return CurrentTable(uidl_of, rank_of, carry)


def _settings_key(settings: BridgeSettings) -> tuple[object, ...]:
    uidl, delete = settings.uidl, settings.delete
    key_digest = hashlib.sha256(delete.signing_key).hexdigest()
    return (uidl.format, uidl.reuse_x_uidl, uidl.imported, uidl.keep_across_uidvalidity, delete.state_folder, key_digest)


class UidlMemory:
    """Every maildrop this process remembers (`SharedServices.uidls`)."""

    def __init__(self, max_maildrops: int = MAX_MAILDROPS, max_weight: int = MAX_WEIGHT) -> None:
        self._entries: OrderedDict[tuple[object, ...], MaildropMemory] = OrderedDict()
        self._weights: dict[tuple[object, ...], int] = {}
        self._weight = 0
        self._max_maildrops = max_maildrops
        self._max_weight = max_weight

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, account: str, settings: BridgeSettings) -> tuple[tuple[object, ...], MaildropMemory]:
        """The account's maildrop as remembered under these settings (a changed [uidl] or
        state key starts afresh), and its key for `remembered`."""
        key = (account_key(account), settings.upstream.mailbox, _settings_key(settings))
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = MaildropMemory()
        self._entries.move_to_end(key)
        return key, found

    def remembered(self, key: tuple[object, ...], entry: MaildropMemory) -> None:
        """`entry` has changed size; forget the least recently used maildrops beyond the bounds."""
        if self._entries.get(key) is entry:
            self._weight += entry.weight - self._weights.get(key, 0)
            self._weights[key] = entry.weight
        while self._entries and (len(self._entries) > self._max_maildrops or self._weight > self._max_weight):
            old, _entry = self._entries.popitem(last=False)
            self._weight -= self._weights.pop(old, 0)
