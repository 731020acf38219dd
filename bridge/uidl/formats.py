"""What a UIDL may be, and the UIDL a message gets when nothing was recorded for it.

RFC 1939: 1 to 70 characters from 0x21 to 0x7E, unique within the maildrop. Ids from outside
(an old server's UIDL, an X-UIDL header, an EMAILID) that break the rule are never sent as
they are: `foreign_uidl` maps them to a hash form, the same one every time. Two messages
that would share a UIDL (copies with one X-UIDL, a broken old server) are told apart by
`unique_uidls`: the first in maildrop order keeps it, the others get a hash form.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from functools import lru_cache

from bridge.config.uidl import FormatPart, parse_uidl_format

_VALID = re.compile(r"[\x21-\x7e]{1,70}")
# Hash forms start with "~", which no preset and no id this module passes through as valid
# begins with by design; 1 + 32 characters.
_HASH_PREFIX = "~"


def is_valid_uidl(text: str) -> bool:
    return _VALID.fullmatch(text) is not None


def _hash_form(*parts: bytes) -> str:
    return _HASH_PREFIX + hashlib.sha256(b"\0".join(parts)).hexdigest()[:32]


def foreign_uidl(raw: str | bytes) -> str:
    """An id from outside as a UIDL: itself when it is 1-70 characters of 0x21-0x7E, else a
    hash form of it (never sent as it is: it could break the UIDL answer or inject into it)."""
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return _hash_form(b"foreign", data)
    return text if is_valid_uidl(text) else _hash_form(b"foreign", data)


def unique_uidls(uids: Sequence[int], uidls: Sequence[str], ranks: Sequence[int] | None = None) -> list[str]:
    """`uidls` (in maildrop order) with every repeat replaced by a hash form of the UIDL and
    its message's UID. The message of the lowest rank keeps it (a recorded UIDL before an
    X-UIDL before the configured format), the earlier one among equals."""
    order = range(len(uids)) if ranks is None else sorted(range(len(uids)), key=ranks.__getitem__)
    out = list(uidls)
    seen: set[str] = set()
    for index in order:
        uidl = out[index]
        if uidl in seen:
            uidl = out[index] = _hash_form(b"repeat", uidl.encode("ascii"), b"%d" % uids[index])
        seen.add(uidl)
    return out


class UidlFormat:
    """The UIDL of a message nothing was recorded for: `[uidl] format` filled in with its UID
    and the maildrop's UIDVALIDITY."""

    def __init__(self, parts: tuple[FormatPart, ...]) -> None:
        self.parts = parts
        self.render: Callable[[int, int], str] = _compile(parts)


@lru_cache(maxsize=32)
def uidl_format(text: str) -> UidlFormat:
    """The format of `[uidl] format` (one object per format, so what is memoised with it
    stays valid)."""
    return UidlFormat(parse_uidl_format(text))


def _compile(parts: tuple[FormatPart, ...]) -> Callable[[int, int], str]:
    """A renderer: the presets as one f-string each (a 5,000-message listing renders 5,000
    UIDLs), anything else part by part."""
    variables = [part for part in parts if part.variable is not None]
    if len(parts) == 2 and all(p.hexadecimal and p.zero_pad and p.width == 8 and not p.case for p in variables):
        if [p.variable for p in parts] == ["u", "v"]:
            return lambda uid, uidvalidity: f"{uid:08x}{uidvalidity:08x}"
        if [p.variable for p in parts] == ["v", "u"]:
            return lambda uid, uidvalidity: f"{uidvalidity:08x}{uid:08x}"
    return lambda uid, uidvalidity: "".join(part.render(uid, uidvalidity) for part in parts)
