"""The maildrop as a session sees it: a snapshot taken at login."""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    size: int


class MailboxSnapshot:
    """The maildrop as it was when the session logged in, in UID order: UIDs and sizes as
    two packed columns (`array`), so a poll builds no object per message and a 200,000-message
    snapshot takes about 2.4 MB. Immutable: nobody changes the columns once made (columns
    handed in as arrays of the right type are taken as they are, not copied); an engine may
    hand the same snapshot to every session while the mailbox stays unchanged, and what
    sessions derive from it is kept with it (`derived`). UIDs must be 32-bit and strictly
    ascending (ValueError otherwise: what sessions derive relies on no UID being there twice),
    sizes 63-bit (OverflowError otherwise; bridge.imap.listing checks what a server sends
    first)."""

    __slots__ = ("_derived", "sizes", "uids", "uidvalidity")

    def __init__(self, uidvalidity: int, uids: Sequence[int], sizes: Sequence[int]) -> None:
        if len(uids) != len(sizes):
            raise ValueError("a snapshot needs one size per UID")
        self.uidvalidity = uidvalidity
        self.uids = _column("I", uids)
        self.sizes = _column("q", sizes)
        if not all(map(int.__lt__, self.uids, itertools.islice(self.uids, 1, None))):
            raise ValueError("a snapshot's UIDs must be strictly ascending")
        self._derived: dict[Callable[[MailboxSnapshot], Any], Any] = {}

    @classmethod
    def of(cls, uidvalidity: int, messages: Iterable[MessageInfo]) -> MailboxSnapshot:
        listed = list(messages)
        return cls(uidvalidity, [info.uid for info in listed], [info.size for info in listed])

    @property
    def messages(self) -> tuple[MessageInfo, ...]:
        return tuple(MessageInfo(uid, size) for uid, size in zip(self.uids, self.sizes, strict=True))

    def derived(self, compute: Callable[[MailboxSnapshot], _T]) -> _T:
        """`compute(self)`, worked out once per snapshot whichever session asks (keyed by
        the function itself)."""
        try:
            return self._derived[compute]  # type: ignore[no-any-return]
        except KeyError:
            value = self._derived[compute] = compute(self)
            return value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MailboxSnapshot):
            return NotImplemented
        return (self.uidvalidity, self.uids, self.sizes) == (other.uidvalidity, other.uids, other.sizes)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MailboxSnapshot(uidvalidity={self.uidvalidity}, messages={len(self.uids)})"


def _column(typecode: str, values: Sequence[int]) -> array[int]:
    if isinstance(values, array) and values.typecode == typecode:
        return values
    return array(typecode, values)
