"""What a connection learns from the server's answers, without any I/O.

Every untagged response an engine reads goes to `ServerView.untagged`, every tagged status to
`ServerView.status`. The view keeps the capabilities, and of the selected folder its EXISTS
count, UIDVALIDITY, HIGHESTMODSEQ and the highest MODSEQ seen in FETCH responses (RFC 3501,
RFC 7162), and feeds the warm listing (`bridge.imap.listing`) while one is kept. Numbers beyond
`bridge.imap.limits` raise UpstreamImplausible.
"""

from __future__ import annotations

import re

from bridge.imap import syntax
from bridge.imap.errors import UpstreamImplausible
from bridge.imap.limits import MAX_MAILDROP_MESSAGES
from bridge.imap.listing import MaildropListing

_CODE_NUMBER = re.compile(rb"\[(UIDVALIDITY|HIGHESTMODSEQ|UIDNEXT) (\d+)\]", re.IGNORECASE)
_DELETED = re.compile(rb"\\Deleted\b", re.IGNORECASE)
# A FETCH answer to our own UID FETCH (UID BODY.PEEK[...]), literal taken out: one match
# instead of several searches per message of a batch.
_BODY_FETCH = re.compile(rb"\* (\d+) FETCH \(UID (\d+) BODY\[[^\]]*\](?:<\d+>)? \{\d+\}\)$")
# The listing line as Dovecot and most servers order it (the order we ask for): one match
# instead of four searches on the hot path of a 5,000-message listing.
_LISTING_LINE = re.compile(
    rb"\* (\d+) FETCH \(UID (\d+) RFC822\.SIZE (\d+) FLAGS \(([^)]*)\)(?: MODSEQ \((\d+)\))?\)$", re.IGNORECASE
)
# The same line as the reader holds it, CRLF included, for `ResponseReader.take_matching_lines`:
# every repeated part bounded (numbers of at most 20 digits, a flag list of at most 1,000
# bytes), since lines taken this way are not held to the reader's line limit.
LISTING_LINES = re.compile(
    rb"\* (\d{1,20}) FETCH \(UID (\d{1,20}) RFC822\.SIZE (\d{1,20}) FLAGS \(([^)\r\n]{0,1000})\)"
    rb"(?: MODSEQ \((\d{1,20})\))?\)\r\n",
    re.IGNORECASE,
)


class ServerView:
    def __init__(self) -> None:
        self.capabilities: frozenset[str] = frozenset()
        self.exists = 0
        self.uidvalidity: int | None = None
        self.highest_modseq: int | None = None
        self.modseq_seen: int | None = None
        # The warm listing of the maildrop, while the connection keeps one.
        self.listing: MaildropListing | None = None
        self.bye = False

    def forget_folder(self) -> None:
        """A SELECT is on its way: what was known of the selected folder no longer holds."""
        self.exists = 0
        self.uidvalidity = self.highest_modseq = None

    def untagged(self, text: bytes) -> None:
        """One untagged response (its text, literal markers in place)."""
        listing = self.listing
        if (body_fetch := _BODY_FETCH.match(text)) is not None:
            if listing is not None:
                listing.fetched(int(body_fetch.group(1)), int(body_fetch.group(2)), None, None)
            return
        if listing is not None and (line := _LISTING_LINE.match(text)) is not None:
            number, uid, size, flags, modseq = line.groups()
            if modseq is not None:
                self._saw_modseq(int(modseq))
            listing.fetched(int(number), int(uid), int(size), b"\\deleted" in flags.lower())
            return
        body = text[2:]
        number = syntax.UNTAGGED_NUMBER.match(body)
        if number is not None:
            self._numbered(int(number.group(1)), number.group(2).upper(), body)
            return
        upper = body[:24].upper()
        if upper.startswith(b"VANISHED"):
            self._vanished(body, earlier=upper.startswith(b"VANISHED (EARLIER)"))
        elif upper.startswith(b"CAPABILITY"):
            self.capabilities = frozenset(body[10:].decode("ascii", "replace").upper().split())
        elif upper.startswith((b"OK", b"NO")):
            self.status(body)
        elif upper.startswith(b"BYE"):
            self.bye = True

    def listing_rows(self, rows: list[tuple[bytes | None, ...]]) -> None:
        """Listing lines taken in bulk (`LISTING_LINES` groups), as `untagged` would take
        them one by one: the hot path of a full listing, thousands per chunk received."""
        listing = self.listing
        assert listing is not None
        fetched = listing.fetched
        for number, uid, size, flags, modseq in rows:
            if modseq is not None:
                self._saw_modseq(int(modseq))
            fetched(int(number), int(uid), int(size), b"\\deleted" in flags.lower())  # type: ignore[arg-type, union-attr]

    def status(self, text: bytes) -> None:
        """The response codes of a status text (tagged, or an untagged OK/NO)."""
        for name, value in _CODE_NUMBER.findall(text):
            key = name.upper()
            if key == b"UIDVALIDITY":
                self.uidvalidity = int(value)
            elif key == b"HIGHESTMODSEQ":
                self.highest_modseq = int(value)
        if b"[CAPABILITY" in text.upper() and (capabilities := syntax.capabilities_in(text)) is not None:
            self.capabilities = capabilities

    def body_fetched(self, number: int, uid: int) -> None:
        """A message body came back in a batch FETCH (`ResponseReader.take_body_fetch`)."""
        if self.listing is not None:
            self.listing.fetched(number, uid, None, None)

    def _numbered(self, count: int, kind: bytes, body: bytes) -> None:
        if count > MAX_MAILDROP_MESSAGES:
            name = kind.decode()
            what = f"{name} {count}" if kind in (b"EXISTS", b"RECENT") else f"{name} of sequence number {count}"
            raise UpstreamImplausible(f"{what}: more than {MAX_MAILDROP_MESSAGES} messages")
        listing = self.listing
        if kind == b"EXISTS":
            self.exists = count
            if listing is not None:
                listing.exists(count)
        elif kind == b"EXPUNGE":
            self.exists -= 1
            if listing is not None:
                listing.expunge(count)
        elif kind == b"FETCH" and listing is not None:
            uid = syntax.FETCH_UID.search(body)
            size = syntax.FETCH_SIZE.search(body)
            flags = syntax.FETCH_FLAGS.search(body)
            modseq = syntax.FETCH_MODSEQ.search(body)
            if modseq is not None:
                self._saw_modseq(int(modseq.group(1)))
            listing.fetched(
                count,
                int(uid.group(1)) if uid else None,
                int(size.group(1)) if size else None,
                bool(_DELETED.search(flags.group(1))) if flags else None,
            )

    def _vanished(self, body: bytes, *, earlier: bool) -> None:
        uid_set = body.rsplit(b" ", 1)[-1]
        if not earlier:
            # Without EARLIER every UID named was in the mailbox (RFC 7162 3.2.10); EARLIER
            # may name UIDs that never existed, so only its width is harmless.
            count = sum(high - low + 1 for low, high in syntax.uid_set_ranges(uid_set))
            if count > MAX_MAILDROP_MESSAGES:
                raise UpstreamImplausible(f"VANISHED of {count} messages: more than {MAX_MAILDROP_MESSAGES}")
            self.exists -= count
        if self.listing is not None:
            self.listing.vanish(syntax.uid_set_ranges(uid_set))

    def _saw_modseq(self, value: int) -> None:
        self.modseq_seen = value if self.modseq_seen is None else max(self.modseq_seen, value)
