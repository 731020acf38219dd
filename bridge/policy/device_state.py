"""Per-device POP3 state, kept upstream in the mailbox owner's own IMAP store.

Each device's state is one small message in a hidden state folder (default "POP3 Bridge
State"): a header `X-Pop3-Bridge-Device: <device>` and a JSON body naming the maildrop folder,
its UIDVALIDITY, the UIDs the device has hidden (as ranges: "1:500,502"), when the device was
last seen, and a MAC. Any IMAP4rev1 server can hold it (no keywords, so Dovecot maildir's
26-keyword limit does not matter), 50 devices are 50 messages, and 100,000 hidden messages
downloaded in order are one range.

Whoever can put a message into that folder (its owner, a shared-folder writer, `+detail`
delivery, a Sieve rule) can plant a record, so a record is read as hostile input: only its
first MAX_RECORD_TEXT bytes are fetched, a record that long or longer, malformed, or with
more than MAX_RANGES_PER_RECORD ranges is ignored, and it is trusted only with a valid MAC:
HMAC-SHA256 under the server key (`delete.state_key`) over everything it claims, the account
included, so a record copied from another account's folder is not trusted either. An
ignored record is logged (`device_state_ignored`, with the reason and its UID, never its
body) and left where it is. Its claimed `last_seen` may still hold mail back from expiry
(an unverified device counts as seen and as having hidden nothing): a record the bridge
cannot authenticate can make it keep mail longer, never delete it.

Writing is atomic and never loses a concurrent writer's deletions: a save APPENDs a new
version holding the union of every version it read plus its own changes, then expunges only
the versions it read. Two writers racing (two bridge processes) each leave their own version;
the next reader takes the union of all versions present. A crash between APPEND and expunge
leaves two versions, which the union also covers. A state too big for one record is saved as
several versions (parts), read back by the same union.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol

from bridge.config import account_key, is_device_name
from bridge.imap.errors import UpstreamError
from bridge.imap.limits import TEXT_FETCH_LIMIT
from bridge.imap.syntax import quote_string
from bridge.ops.logs import get_logger
from bridge.policy.uid_ranges import MAX_UID, UidRanges

STATE_HEADER = "X-Pop3-Bridge-Device"
STATE_FORMAT = 1
# Only this much of a record is fetched; a record whose text is this long or longer is
# ignored (the bridge writes several smaller records instead).
MAX_RECORD_TEXT = TEXT_FETCH_LIMIT
MAX_RANGES_PER_RECORD = 10_000
_MAC_LABEL = "pop3-imap-bridge device state"
_MAC_TEXT = re.compile(r"[0-9a-f]{64}")
_READ_ATTEMPTS = 5
# Records fetched per round trip: bounds what a read holds at once (at most 64 KiB each).
_FETCH_BATCH = 64
# Warnings per read about records that were ignored; a folder stuffed with junk does not
# flood the log on every login.
_MAX_IGNORED_WARNINGS = 10
_log = get_logger(component="device_state")


def signed_by(fields: Mapping[str, Any], mac_of: Callable[[Mapping[str, Any]], str]) -> bool:
    """Whether a record's `fields` carry a well-formed "mac" equal to `mac_of(fields)` (also
    for the UIDL records, bridge.uidl.records)."""
    mac = fields.get("mac")
    if not isinstance(mac, str) or _MAC_TEXT.fullmatch(mac) is None:
        return False
    return hmac.compare_digest(mac, mac_of(fields))


class StateChanging(UpstreamError):
    """Other writers kept replacing state versions while this one read them."""


class RecordIgnored(Exception):
    """A state record the bridge does not use; `reason` is a stable name for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StateBackend(Protocol):
    """What the store needs from an upstream connection (bridge.imap.mailbox.ImapMailbox provides it)."""

    async def ensure_folder(self, folder: str) -> None: ...
    async def append(self, folder: str, message: bytes) -> tuple[int, int] | None: ...
    async def search(self, folder: str, *criteria: str) -> list[int]: ...
    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]: ...
    async def delete_in(self, folder: str, uids: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class StateSigner:
    """Signs and checks the records of one upstream account with the server key."""

    key: bytes
    account: str
    # delete.accept_unsigned_state: read records without a MAC (written before records
    # were signed); what they hide is kept apart and never counts for expiry.
    accept_unsigned: bool = False

    def mac(self, fields: Mapping[str, Any]) -> str:
        """HMAC-SHA256 over the canonical encoding of what a record claims: a JSON array of a
        fixed label, the format, the account (lower-cased, see bridge.config.account_key),
        the maildrop folder, UIDVALIDITY, the device, both UID sets and last_seen."""
        signed = json.dumps(
            [
                _MAC_LABEL,
                fields["format"],
                account_key(self.account),
                fields["mailbox"],
                fields["uidvalidity"],
                fields["device"],
                fields["hidden"],
                fields.get("hidden_unsigned", ""),
                fields["last_seen"],
            ],
            ensure_ascii=True,
            separators=(",", ":"),
        )
        return hmac.new(self.key, signed.encode("ascii"), hashlib.sha256).hexdigest()

    def verify(self, fields: Mapping[str, Any]) -> bool:
        return signed_by(fields, self.mac)


@dataclass(frozen=True)
class StateClaims:
    """What a well-formed record says, not yet trusted."""

    fields: Mapping[str, Any]
    device: str
    mailbox: str
    uidvalidity: int

    def claimed_last_seen(self) -> datetime | None:
        try:
            return _aware_time(self.fields["last_seen"])
        except RecordIgnored:
            return None


@dataclass(frozen=True)
class StateRecord:
    """A record as trusted: signed, or unsigned and accepted for migration."""

    device: str
    mailbox: str
    uidvalidity: int
    hidden: UidRanges
    hidden_unsigned: UidRanges
    last_seen: datetime
    signed: bool


def _aware_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RecordIgnored("bad_timestamp") from None
    if moment.utcoffset() is None:
        raise RecordIgnored("bad_timestamp")
    return moment


def read_claims(text: bytes) -> StateClaims:
    """The fields of a record's text, checked for shape (raises RecordIgnored)."""
    if len(text) >= MAX_RECORD_TEXT:
        raise RecordIgnored("too_large")
    try:
        data = json.loads(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordIgnored("not_json") from None
    if not isinstance(data, dict) or type(data.get("format")) is not int or data["format"] != STATE_FORMAT:
        raise RecordIgnored("bad_format")
    device, mailbox, uidvalidity = data.get("device"), data.get("mailbox"), data.get("uidvalidity")
    shaped = (
        isinstance(device, str)
        and is_device_name(device)
        and isinstance(mailbox, str)
        and type(uidvalidity) is int
        and 1 <= uidvalidity <= MAX_UID
        and isinstance(data.get("hidden"), str)
        and isinstance(data.get("hidden_unsigned", ""), str)
        and isinstance(data.get("last_seen"), str)
        and isinstance(data.get("mac", ""), str)
    )
    if not shaped:
        raise RecordIgnored("bad_format")
    return StateClaims(data, device, mailbox, uidvalidity)


def _ranges(text: str) -> UidRanges:
    if text.count(",") >= MAX_RANGES_PER_RECORD:
        raise RecordIgnored("too_many_ranges")
    try:
        return UidRanges.parse(text)
    except ValueError:
        raise RecordIgnored("bad_ranges") from None


def trust(claims: StateClaims, signer: StateSigner) -> StateRecord:
    """The record, if its MAC is valid (or it is unsigned and the signer accepts that) and
    it is within the bounds; raises RecordIgnored otherwise."""
    fields = claims.fields
    if "mac" in fields:
        if not signer.verify(fields):
            raise RecordIgnored("bad_mac")
        signed = True
    elif signer.accept_unsigned:
        signed = False
    else:
        raise RecordIgnored("unsigned")
    hidden = _ranges(fields["hidden"])
    hidden_unsigned = _ranges(fields.get("hidden_unsigned", ""))
    if hidden.range_count + hidden_unsigned.range_count > MAX_RANGES_PER_RECORD:
        raise RecordIgnored("too_many_ranges")
    last_seen = _aware_time(fields["last_seen"])
    if not signed:
        hidden, hidden_unsigned = UidRanges(), hidden.union(hidden_unsigned)
    return StateRecord(claims.device, claims.mailbox, claims.uidvalidity, hidden, hidden_unsigned, last_seen, signed)


def read_record(text: bytes, signer: StateSigner) -> StateRecord:
    """A record's text (its BODY[TEXT]) as trusted, or RecordIgnored with the reason."""
    return trust(read_claims(text), signer)


def render_state(
    signer: StateSigner,
    device: str,
    mailbox: str,
    uidvalidity: int,
    hidden: UidRanges,
    now: datetime,
    hidden_unsigned: UidRanges | None = None,
) -> bytes:
    """One signed record (a whole message). ValueError if it would be too large to be read
    back: render_versions splits a big state into records that fit."""
    fields: dict[str, Any] = {
        "format": STATE_FORMAT,
        "device": device,
        "mailbox": mailbox,
        "uidvalidity": uidvalidity,
        "hidden": str(hidden),
    }
    if hidden_unsigned:
        fields["hidden_unsigned"] = str(hidden_unsigned)
    fields["last_seen"] = now.isoformat()
    fields["mac"] = signer.mac(fields)
    body = json.dumps(fields, separators=(",", ":")) + "\r\n"
    if len(body) >= MAX_RECORD_TEXT:
        raise ValueError(f"a state record of {len(body)} bytes could not be read back")
    headers = [
        "From: pop3-imap-bridge <postmaster@localhost>",
        f"Subject: POP3 device state: {device}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{secrets.token_hex(12)}@pop3-imap-bridge>",
        f"{STATE_HEADER}: {device}",
        "MIME-Version: 1.0",
        "Content-Type: application/json; charset=us-ascii",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("ascii")


def _parts(hidden: UidRanges, hidden_unsigned: UidRanges, budget: int) -> Iterator[tuple[UidRanges, UidRanges]]:
    """(hidden, hidden_unsigned) pieces of at most MAX_RANGES_PER_RECORD ranges and `budget`
    characters of range text each; one (empty) piece for an empty state."""
    pieces: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
    used = count = 0
    for which, ranges in enumerate((hidden, hidden_unsigned)):
        for start, end in ranges.pairs():
            size = len(f"{start}:{end},")
            if count and (count == MAX_RANGES_PER_RECORD or used + size > budget):
                yield UidRanges(pieces[0]), UidRanges(pieces[1])
                pieces, used, count = ([], []), 0, 0
            pieces[which].append((start, end))
            used += size
            count += 1
    yield UidRanges(pieces[0]), UidRanges(pieces[1])


def render_versions(
    signer: StateSigner,
    device: str,
    mailbox: str,
    uidvalidity: int,
    hidden: UidRanges,
    hidden_unsigned: UidRanges,
    now: datetime,
) -> list[bytes]:
    """The records (usually one) that together hold a device's state, each small enough to
    be read back."""
    empty = render_state(signer, device, mailbox, uidvalidity, UidRanges(), now, UidRanges())
    # What the range text may take beside the rest of a record (and the unsigned field's
    # name, when present), with room to spare.
    budget = MAX_RECORD_TEXT - len(empty) - 256
    if budget < 1024:
        raise ValueError("the maildrop folder name leaves no room in a state record")
    return [
        render_state(signer, device, mailbox, uidvalidity, part, now, unsigned)
        for part, unsigned in _parts(hidden, hidden_unsigned, budget)
    ]


@dataclass(frozen=True)
class UidCarry:
    """The maildrop's messages before its UIDVALIDITY changed, paired with the ones now
    (bridge.uidl, `[uidl] keep_across_uidvalidity`): what a device hid under the old UIDs it
    keeps hidden under the new ones."""

    from_uidvalidity: int
    new_uid_of: Mapping[int, int]

    def translate(self, hidden: UidRanges) -> UidRanges:
        """The new UIDs of the old ones in `hidden` (old UIDs with no partner are dropped)."""
        return UidRanges.of(new for old, new in self.new_uid_of.items() if old in hidden)


@dataclass
class DeviceState:
    device: str
    # UIDs the device hid in signed records: they hide mail from it and count for expiry.
    hidden: UidRanges = field(default_factory=UidRanges)
    # UIDs only unsigned records (before records were signed) hid: they hide mail from the
    # device but never count for expiry.
    hidden_unsigned: UidRanges = field(default_factory=UidRanges)
    last_seen: datetime | None = None
    # UIDs (in the state folder) of the versions this state was read from, replaced at the
    # next save. Records that were ignored are never among them.
    versions: list[int] = field(default_factory=list)
    # Read from an unsigned record: to be saved signed at the next QUIT.
    needs_signing: bool = False
    # Read from a record of the maildrop before its UIDVALIDITY changed (UidCarry): to be
    # saved under the new one at the next QUIT.
    carried: bool = False

    def hides(self, uid: int) -> bool:
        return uid in self.hidden or uid in self.hidden_unsigned

    def restrict_to(self, uids: Sequence[int]) -> None:
        """Only UIDs of the session's snapshot stay hidden (see UidRanges.restricted_to)."""
        self.hidden = self.hidden.restricted_to(uids)
        self.hidden_unsigned = UidRanges.of(
            uid for uid in uids if uid in self.hidden_unsigned and uid not in self.hidden
        )


class DeviceStateStore:
    def __init__(
        self, backend: StateBackend, folder: str, mailbox: str, signer: StateSigner, carry: UidCarry | None = None
    ) -> None:
        self._backend = backend
        self._folder = folder
        self._mailbox = mailbox
        self._signer = signer
        self._carry = carry

    def rebind(self, backend: StateBackend) -> None:
        """Go on over another connection of the same account (a session's command may run on
        another connection than its login: bridge.session.upstream)."""
        self._backend = backend

    async def _read(self, device: str | None, uidvalidity: int) -> dict[str, DeviceState]:
        await self._backend.ensure_folder(self._folder)
        for _attempt in range(_READ_ATTEMPTS):
            # SEARCH HEADER is a substring match and "" matches every message with the
            # header; the JSON body decides which device a version belongs to. Versions
            # flagged \Deleted are superseded (a server without UIDPLUS keeps them).
            uids = await self._backend.search(
                self._folder, "UNDELETED", "HEADER", STATE_HEADER, quote_string(device or "")
            )
            states: dict[str, DeviceState] = {}
            ignored: list[tuple[int, str]] = []
            for start in range(0, len(uids), _FETCH_BATCH):
                batch = uids[start : start + _FETCH_BATCH]
                texts = await self._backend.fetch_texts(self._folder, batch)
                if not set(texts) >= set(batch):
                    # A version vanished between SEARCH and FETCH: another bridge saved that
                    # device meanwhile, and its newer version (appended before the expunge)
                    # is found by searching again. Reading on without it would look as if
                    # the device had hidden nothing, or did not exist, which expiry must
                    # never believe.
                    break
                for uid in batch:
                    try:
                        self._take(states, uid, texts[uid], device, uidvalidity)
                    except RecordIgnored as exc:
                        ignored.append((uid, exc.reason))
            else:
                self._warn_ignored(ignored)
                return states
        raise StateChanging(f"device state in {self._folder!r} kept changing while being read")

    def _take(
        self, states: dict[str, DeviceState], uid: int, text: bytes, device: str | None, uidvalidity: int
    ) -> None:
        """Add one version to `states`; RecordIgnored if it cannot be used."""
        claims = read_claims(text)
        if claims.mailbox != self._mailbox or (device is not None and claims.device != device):
            return  # another maildrop's or another device's record: not ours to judge
        try:
            record = trust(claims, self._signer)
        except RecordIgnored as exc:
            if exc.reason in ("unsigned", "bad_mac"):
                # Not trusted to hide anything; its claim to have been seen may still hold
                # mail back from expiry (the safe direction).
                _seen(states.setdefault(claims.device, DeviceState(claims.device)), claims.claimed_last_seen())
            raise
        state = states.setdefault(record.device, DeviceState(record.device))
        state.versions.append(uid)
        state.needs_signing |= not record.signed
        carry = self._carry
        if record.uidvalidity == uidvalidity:
            state.hidden = state.hidden.union(record.hidden)
            state.hidden_unsigned = state.hidden_unsigned.union(record.hidden_unsigned)
        elif carry is not None and record.uidvalidity == carry.from_uidvalidity:
            # The folder was recreated and its messages re-matched: the same messages under
            # their new UIDs.
            state.hidden = state.hidden.union(carry.translate(record.hidden))
            state.hidden_unsigned = state.hidden_unsigned.union(carry.translate(record.hidden_unsigned))
            state.carried = True
            _log.debug(
                "device_state_carried", device=record.device, stored_uidvalidity=record.uidvalidity,
                uidvalidity=uidvalidity,
            )
        else:
            # The folder was recreated: old UIDs mean other messages now. Forgetting
            # them makes the device download again, the safe direction. The device
            # stays known (last_seen), so expiry keeps holding mail back for it.
            _log.warning(
                "device_state_reset", device=record.device, stored_uidvalidity=record.uidvalidity,
                uidvalidity=uidvalidity,
            )
        _seen(state, record.last_seen)

    @staticmethod
    def _warn_ignored(ignored: list[tuple[int, str]]) -> None:
        for uid, reason in ignored[:_MAX_IGNORED_WARNINGS]:
            _log.warning("device_state_ignored", reason=reason, state_uid=uid)
        if len(ignored) > _MAX_IGNORED_WARNINGS:
            _log.warning("device_state_ignored_more", count=len(ignored) - _MAX_IGNORED_WARNINGS)

    async def load(self, device: str, uidvalidity: int) -> DeviceState:
        return (await self._read(device, uidvalidity)).get(device, DeviceState(device))

    async def load_all(self, uidvalidity: int) -> dict[str, DeviceState]:
        return await self._read(None, uidvalidity)

    async def save(self, state: DeviceState, uidvalidity: int, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        try:
            messages = render_versions(
                self._signer, state.device, self._mailbox, uidvalidity, state.hidden, state.hidden_unsigned, now
            )
        except ValueError as exc:
            raise UpstreamError(f"device state cannot be saved: {exc}") from None
        for message in messages:
            await self._backend.append(self._folder, message)
        # Only the versions this state was built from: a version another writer added since
        # stays, and the next reader merges it; so does a record that could not be trusted.
        await self._backend.delete_in(self._folder, state.versions)
        _log.debug(
            "device_state_saved", device=state.device, ranges=state.hidden.range_count, records=len(messages)
        )


def _seen(state: DeviceState, moment: datetime | None) -> None:
    if moment is not None and (state.last_seen is None or moment > state.last_seen):
        state.last_seen = moment
