"""Per-device POP3 state, kept upstream in the mailbox owner's own IMAP store.

Each device's state is one small message in a hidden state folder (default "POP3 Bridge
State"): a header `X-Pop3-Bridge-Device: <device>` and a JSON body naming the maildrop folder,
its UIDVALIDITY, the UIDs the device has hidden (as ranges: "1:500,502"), and when the device
was last seen. Any IMAP4rev1 server can hold it (no keywords, so Dovecot maildir's 26-keyword
limit does not matter), 50 devices are 50 messages, and 100,000 hidden messages downloaded in
order are one range.

Writing is atomic and never loses a concurrent writer's deletions: a save APPENDs a new
version holding the union of every version it read plus its own changes, then expunges only
the versions it read. Two writers racing (two bridge processes) each leave their own version;
the next reader takes the union of all versions present. A crash between APPEND and expunge
leaves two versions, which the union also covers.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Protocol

from bridge.observability import get_logger
from bridge.uid_ranges import UidRanges
from bridge.upstream.imap_syntax import quote_string
from bridge.upstream.interface import UpstreamError

STATE_HEADER = "X-Pop3-Bridge-Device"
STATE_FORMAT = 1
_READ_ATTEMPTS = 5
_log = get_logger(component="device_state")


class StateChanging(UpstreamError):
    """Other writers kept replacing state versions while this one read them."""


class StateBackend(Protocol):
    """What the store needs from an upstream connection (see bridge.upstream)."""

    async def ensure_folder(self, folder: str) -> None: ...
    async def append(self, folder: str, message: bytes) -> None: ...
    async def search(self, folder: str, *criteria: str) -> list[int]: ...
    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]: ...
    async def delete_in(self, folder: str, uids: Sequence[int]) -> None: ...


@dataclass
class DeviceState:
    device: str
    hidden: UidRanges = field(default_factory=UidRanges)
    last_seen: datetime | None = None
    # UIDs (in the state folder) of the versions this state was read from.
    versions: list[int] = field(default_factory=list)


def render_state(device: str, mailbox: str, uidvalidity: int, hidden: UidRanges, now: datetime) -> bytes:
    body = json.dumps(
        {
            "format": STATE_FORMAT,
            "device": device,
            "mailbox": mailbox,
            "uidvalidity": uidvalidity,
            "hidden": str(hidden),
            "last_seen": now.isoformat(),
        },
        separators=(",", ":"),
    )
    headers = [
        "From: pop3-imap-bridge <postmaster@localhost>",
        f"Subject: POP3 device state: {device}",
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{secrets.token_hex(12)}@pop3-imap-bridge>",
        f"{STATE_HEADER}: {device}",
        "MIME-Version: 1.0",
        "Content-Type: application/json; charset=us-ascii",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body + "\r\n").encode("ascii")


def parse_state(text: bytes) -> dict[str, object] | None:
    try:
        data = json.loads(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        return None
    return data


class DeviceStateStore:
    def __init__(self, backend: StateBackend, folder: str, mailbox: str) -> None:
        self._backend = backend
        self._folder = folder
        self._mailbox = mailbox

    async def _read_versions(self, device: str | None) -> dict[int, bytes]:
        for _attempt in range(_READ_ATTEMPTS):
            # SEARCH HEADER is a substring match and "" matches every message with the
            # header; the JSON body decides which device a version belongs to.
            uids = await self._backend.search(self._folder, "HEADER", STATE_HEADER, quote_string(device or ""))
            texts = await self._backend.fetch_texts(self._folder, uids)
            if set(texts) >= set(uids):
                return texts
            # A version vanished between SEARCH and FETCH: another bridge saved that
            # device meanwhile, and its newer version (appended before the expunge) is
            # found by searching again. Reading on without it would look as if the device
            # had hidden nothing, or did not exist, which expiry must never believe.
        raise StateChanging(f"device state in {self._folder!r} kept changing while being read")

    async def _read(self, device: str | None, uidvalidity: int) -> dict[str, DeviceState]:
        await self._backend.ensure_folder(self._folder)
        texts = await self._read_versions(device)
        states: dict[str, DeviceState] = {}
        for uid, text in sorted(texts.items()):
            data = parse_state(text)
            if data is None or data.get("mailbox") != self._mailbox:
                continue
            name = str(data.get("device"))
            if device is not None and name != device:
                continue
            state = states.setdefault(name, DeviceState(name))
            state.versions.append(uid)
            stale = data.get("uidvalidity") != uidvalidity
            if stale:
                # The folder was recreated: old UIDs mean other messages now. Forgetting
                # them makes the device download again, the safe direction. The device
                # stays known (last_seen), so expiry keeps holding mail back for it.
                _log.warning(
                    "device_state_reset", device=name, stored_uidvalidity=data.get("uidvalidity"),
                    uidvalidity=uidvalidity,
                )
            try:
                if not stale:
                    state.hidden = state.hidden.union(UidRanges.parse(str(data.get("hidden", ""))))
                seen = datetime.fromisoformat(str(data["last_seen"]))
            except (KeyError, ValueError):
                _log.warning("device_state_unreadable", device=name, state_uid=uid)
                continue
            if state.last_seen is None or seen > state.last_seen:
                state.last_seen = seen
        return states

    async def load(self, device: str, uidvalidity: int) -> DeviceState:
        return (await self._read(device, uidvalidity)).get(device, DeviceState(device))

    async def load_all(self, uidvalidity: int) -> dict[str, DeviceState]:
        return await self._read(None, uidvalidity)

    async def save(self, state: DeviceState, uidvalidity: int, now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        message = render_state(state.device, self._mailbox, uidvalidity, state.hidden, now)
        await self._backend.append(self._folder, message)
        # Only the versions this state was built from: a version another writer added since
        # stays, and the next reader merges it.
        await self._backend.delete_in(self._folder, state.versions)
        _log.debug("device_state_saved", device=state.device, ranges=state.hidden.range_count)
