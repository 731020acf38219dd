"""Which message on one side is which message on the other (pure).

Used twice: `uidl import` pairs an old POP3 server's messages with the IMAP store's, and a
maildrop whose UIDVALIDITY changed pairs the messages it had listed with the ones it has now.

The key is a hash of the header (bridge.uidl.headers.header_digest, or an EMAILID where both
sides have one); the size only breaks ties. Why not the size first: a migration through
IMAP APPEND may add a Return-Path, change line ends or drop a Status field, so sizes of the
same message differ, while the reduced header does not. A key found once on each side is a
pair whatever the sizes. A key found more than once on a side (identical copies, or messages
whose headers differ only in skipped fields) is *ambiguous*: its messages are paired first
with a partner of the same size, then in order (the old side's order against UID order).
That is deterministic, and where the copies are identical it is also right: a device sees
the same messages under the UIDLs it knows, whichever copy carries which.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Candidate:
    """A message on one side: `ident` (an old server's message number, or a UID), its key
    (a header digest or an EMAILID; None: it cannot be paired by this key) and a size that
    is comparable across the sides (for import, the body's size: the size less the header)."""

    ident: int
    key: Hashable | None
    size: int


@dataclass
class Pairing:
    pairs: list[tuple[Candidate, Candidate]] = field(default_factory=list)
    unmatched_old: list[Candidate] = field(default_factory=list)
    unmatched_new: list[Candidate] = field(default_factory=list)
    # Pairs made among several candidates of one key (by size, then order).
    ambiguous: int = 0
    # Pairs whose sizes differ (paired by the key all the same).
    size_differs: int = 0


def pair(old: Sequence[Candidate], new: Sequence[Candidate]) -> Pairing:
    """Pair `old` (in the old side's order) with `new` (in UID order) by key."""
    result: Pairing = Pairing()
    by_key_new: dict[Hashable, list[Candidate]] = defaultdict(list)
    for candidate in new:
        if candidate.key is not None:
            by_key_new[candidate.key].append(candidate)
    by_key_old: dict[Hashable, list[Candidate]] = defaultdict(list)
    for candidate in old:
        if candidate.key is not None:
            by_key_old[candidate.key].append(candidate)
    paired_old: set[int] = set()
    paired_new: set[int] = set()
    for key, olds in by_key_old.items():
        news = by_key_new.get(key)
        if not news:
            continue
        made = _pair_group(olds, news)
        if len(olds) > 1 or len(news) > 1:
            result.ambiguous += len(made)
        for a, b in made:
            result.pairs.append((a, b))
            paired_old.add(a.ident)
            paired_new.add(b.ident)
            if a.size != b.size:
                result.size_differs += 1
    order = {candidate.ident: index for index, candidate in enumerate(old)}
    result.pairs.sort(key=lambda item: order[item[0].ident])
    result.unmatched_old = [c for c in old if c.ident not in paired_old]
    result.unmatched_new = [c for c in new if c.ident not in paired_new]
    return result


def _pair_group(olds: list[Candidate], news: list[Candidate]) -> list[tuple[Candidate, Candidate]]:
    if len(olds) == 1 and len(news) == 1:
        return [(olds[0], news[0])]
    # Linear in the group, however many identical copies a mailbox holds.
    by_size: dict[int, deque[Candidate]] = defaultdict(deque)
    for candidate in news:
        by_size[candidate.size].append(candidate)
    made: list[tuple[Candidate, Candidate]] = []
    used: set[int] = set()
    waiting: list[Candidate] = []
    for candidate in olds:
        bucket = by_size.get(candidate.size)
        if bucket:
            partner = bucket.popleft()
            used.add(partner.ident)
            made.append((candidate, partner))
        else:
            waiting.append(candidate)
    free = [candidate for candidate in news if candidate.ident not in used]
    made.extend(zip(waiting, free, strict=False))
    return made


def pair_in_stages(
    old: Sequence[Candidate], new: Sequence[Candidate], stages: Sequence[Callable[[Candidate], Candidate]]
) -> Pairing:
    """`pair` by several keys in turn: each stage re-keys the candidates still unpaired
    (e.g. EMAILID first, then the header digest)."""
    total: Pairing = Pairing(unmatched_old=list(old), unmatched_new=list(new))
    pairs: list[tuple[Candidate, Candidate]] = []
    originals_old = {c.ident: c for c in old}
    originals_new = {c.ident: c for c in new}
    for rekey in stages:
        step = pair([rekey(c) for c in total.unmatched_old], [rekey(c) for c in total.unmatched_new])
        pairs.extend((originals_old[a.ident], originals_new[b.ident]) for a, b in step.pairs)
        total.ambiguous += step.ambiguous
        total.size_differs += step.size_differs
        total.unmatched_old = [originals_old[c.ident] for c in step.unmatched_old]
        total.unmatched_new = [originals_new[c.ident] for c in step.unmatched_new]
    order = {candidate.ident: index for index, candidate in enumerate(old)}
    total.pairs = sorted(pairs, key=lambda item: order[item[0].ident])
    return total
