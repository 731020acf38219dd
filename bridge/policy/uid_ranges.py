"""A compact, immutable set of IMAP UIDs kept as sorted, disjoint ranges ("1:500,502")."""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator

MAX_UID = 4294967295  # RFC 3501: UIDs are non-zero 32-bit numbers
_RANGE_TEXT = re.compile(r"([0-9]{1,10})(?::([0-9]{1,10}))?")


class UidRanges:
    __slots__ = ("_ranges", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            if start > end or start < 1:
                raise ValueError(f"bad UID range {start}:{end}")
            if merged and start <= merged[-1][1] + 1:
                if end > merged[-1][1]:
                    merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self._ranges = tuple(merged)
        self._starts = [start for start, _ in merged]

    @classmethod
    def of(cls, uids: Iterable[int]) -> UidRanges:
        return cls((uid, uid) for uid in uids)

    @classmethod
    def parse(cls, text: str) -> UidRanges:
        """"1:500,502" -> UidRanges; ValueError unless every part is a UID or an ascending
        range of UIDs in plain ASCII digits (no signs, spaces or other digits int() takes)."""
        if not text:
            return cls()
        pairs = []
        for part in text.split(","):
            match = _RANGE_TEXT.fullmatch(part)
            if match is None:
                raise ValueError(f"bad UID range {part[:24]!r}")
            first = int(match.group(1))
            last = int(match.group(2) or first)
            if last > MAX_UID:
                raise ValueError(f"UID {last} is beyond 32 bits")
            pairs.append((first, last))
        return cls(pairs)

    def __str__(self) -> str:
        return ",".join(f"{a}:{b}" if a != b else str(a) for a, b in self._ranges)

    def __repr__(self) -> str:
        return f"UidRanges({str(self)!r})"

    def __contains__(self, uid: object) -> bool:
        if not isinstance(uid, int):
            return False
        index = bisect_right(self._starts, uid) - 1
        return index >= 0 and uid <= self._ranges[index][1]

    def __iter__(self) -> Iterator[int]:
        for start, end in self._ranges:
            yield from range(start, end + 1)

    def __len__(self) -> int:
        return sum(end - start + 1 for start, end in self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UidRanges) and self._ranges == other._ranges

    def __hash__(self) -> int:
        return hash(self._ranges)

    def pairs(self) -> tuple[tuple[int, int], ...]:
        """The (first, last) ranges, ascending and disjoint."""
        return self._ranges

    @property
    def range_count(self) -> int:
        return len(self._ranges)

    def union(self, *others: UidRanges) -> UidRanges:
        return UidRanges([r for ranges in (self, *others) for r in ranges._ranges])

    def restricted_to(self, existing: Iterable[int]) -> UidRanges:
        """Only the UIDs in `existing` (a session's snapshot): expunged messages need no
        hiding, and mail that arrives later must never be hidden by a range reaching past
        what the device was shown. Costs one lookup per existing UID, however wide the
        ranges are ("1:4294967295" included)."""
        return UidRanges.of(uid for uid in existing if uid in self)

    def intersection(self, other: UidRanges) -> UidRanges:
        result: list[tuple[int, int]] = []
        i = j = 0
        a, b = self._ranges, other._ranges
        while i < len(a) and j < len(b):
            start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if start <= end:
                result.append((start, end))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return UidRanges(result)
