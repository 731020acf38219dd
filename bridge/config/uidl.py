"""[uidl]: the UIDLs devices see (docs/operators.md, "UIDLs"), and the syntax of `format`.

`format` is Dovecot's `pop3_uidl_format` language, the part of it that an IMAP client can
fill in: `%u` (UID) and `%v` (UIDVALIDITY), with Dovecot's modifiers `X` (hexadecimal, lower case as Dovecot writes it), `L` and `U` (case),
a width (`%08Xu`: padded with zeros to 8; `%3u`: the first 3 characters), an offset
(`%2.3u`) and `%%`. Presets name the formats of the servers POP3 users come from. The
special value "emailid" uses the server's RFC 8474 EMAILID instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import PrivateAttr, field_validator

from bridge.config.base import Section

UIDL_PRESETS = {
    # Dovecot's default pop3_uidl_format: what the bridge has always sent.
    "dovecot": "%08Xu%08Xv",
    # UW IMAP's ipop3d.
    "uw": "%08Xv%08Xu",
    # Cyrus's pop3d.
    "cyrus": "%v.%u",
}
EMAILID_FORMAT = "emailid"
# RFC 1939: a UIDL is 1 to 70 characters from 0x21 to 0x7E.
MAX_UIDL_LENGTH = 70
_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_VARIABLE = re.compile(r"%(-?\d+\.)?(0?)(\d*)([XLU]*)(.)", re.DOTALL)
_NAMES = {"u": "u", "v": "v"}
_MAX_NUMBER = 4294967295


@dataclass(frozen=True, slots=True)
class FormatPart:
    """A literal (`variable` None) or a variable with Dovecot's modifiers."""

    literal: str = ""
    variable: str | None = None  # "u" or "v"
    hexadecimal: bool = False
    case: str = ""  # "L", "U" or ""
    offset: int = 0
    width: int = 0  # 0: all of it
    zero_pad: bool = False

    def render(self, uid: int, uidvalidity: int) -> str:
        if self.variable is None:
            return self.literal
        number = uid if self.variable == "u" else uidvalidity
        text = f"{number:x}" if self.hexadecimal else str(number)
        if self.case == "U":
            text = text.upper()
        if self.zero_pad:
            return text.rjust(self.width, "0") if self.width else text
        text = text[self.offset :]
        return text[: self.width] if self.width else text

    @property
    def whole_uid(self) -> bool:
        """The UID in full (so two messages never share a UIDL through it)."""
        return self.variable == "u" and (self.zero_pad or (self.offset == 0 and self.width == 0))


def parse_uidl_format(text: str) -> tuple[FormatPart, ...]:
    """The parts of a format (a preset's name or a pop3_uidl_format string). ValueError
    says what is wrong: an unknown variable, characters a UIDL cannot hold, a result that
    can be longer than 70 characters, or no full `%u` (UIDLs would repeat)."""
    template = UIDL_PRESETS.get(text, text)
    parts: list[FormatPart] = []
    position = 0
    for found in _VARIABLE.finditer(template):
        if found.start() > position:
            parts.append(FormatPart(literal=template[position : found.start()]))
        position = found.end()
        offset_text, zero, width_text, modifiers, name = found.groups()
        if name == "%":
            parts.append(FormatPart(literal="%"))
            continue
        if name not in _NAMES:
            raise ValueError(
                f"%{name} is not supported: the bridge knows %u (UID) and %v (UIDVALIDITY), "
                f'or a preset: {", ".join(UIDL_PRESETS)}, "{EMAILID_FORMAT}"'
            )
        parts.append(
            FormatPart(
                variable=_NAMES[name],
                hexadecimal="X" in modifiers,
                case="U" if "U" in modifiers else ("L" if "L" in modifiers else ""),
                offset=int(offset_text[:-1]) if offset_text else 0,
                width=int(width_text) if width_text else 0,
                zero_pad=bool(zero),
            )
        )
    if position < len(template):
        parts.append(FormatPart(literal=template[position:]))
    literal = "".join(part.literal for part in parts)
    if _PRINTABLE.fullmatch(literal) is None:
        raise ValueError("a UIDL may hold only the characters 0x21-0x7E (no spaces)")
    if not any(part.whole_uid for part in parts):
        raise ValueError("needs the whole UID (%u, not cut short): without it two messages could share a UIDL")
    longest = "".join(part.render(_MAX_NUMBER, _MAX_NUMBER) for part in parts)
    shortest = "".join(part.render(1, 1) for part in parts)
    if len(longest) > MAX_UIDL_LENGTH:
        raise ValueError(f"gives UIDLs of up to {len(longest)} characters; POP3 allows {MAX_UIDL_LENGTH}")
    if not shortest:
        raise ValueError("gives empty UIDLs")
    return tuple(parts)


class UidlSettings(Section):
    # "dovecot" (%08Xu%08Xv, the default), "uw" (%08Xv%08Xu), "cyrus" (%v.%u), "emailid", or
    # a pop3_uidl_format string.
    format: str = "dovecot"
    # An X-UIDL header (left by qpopper-era servers) is a message's UIDL.
    reuse_x_uidl: bool = False
    # Serve the UIDLs `pop3-imap-bridge uidl import` recorded.
    imported: bool = False
    # Keep UIDLs (and per-device state) when the maildrop's UIDVALIDITY changes.
    keep_across_uidvalidity: bool = False

    _parts: tuple[FormatPart, ...] = PrivateAttr(default=())

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != EMAILID_FORMAT:
            parse_uidl_format(value)
        return value

    def model_post_init(self, context: Any) -> None:
        if self.format != EMAILID_FORMAT:
            self._parts = parse_uidl_format(self.format)

    @property
    def format_parts(self) -> tuple[FormatPart, ...]:
        """The parsed template (empty for "emailid")."""
        return self._parts

    @property
    def uses_emailid(self) -> bool:
        return self.format == EMAILID_FORMAT

    @property
    def keeps_facts(self) -> bool:
        """What the bridge learns of each message (size, header hash, X-UIDL, EMAILID) is
        recorded in the state folder, new messages only."""
        return self.reuse_x_uidl or self.keep_across_uidvalidity

    @property
    def uses_records(self) -> bool:
        """UIDL records in the state folder are read or written: they are signed with the
        state key."""
        return self.imported or self.keeps_facts
