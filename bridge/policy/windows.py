"""What of a huge maildrop a device sees: a window, and a first login "from now on".

An old device chokes on a 200,000-line UIDL listing, or takes hours to download a decade of
mail. Per account or per device (`[delete]`, `[delete.accounts."a@b"]`,
`[delete.accounts."a@b".devices.NAME]`):

- `window = "last-N-messages"`: the N newest messages (highest UIDs) of what the device
  would otherwise see; `window = "last-N-days"`: those the server received on or after the
  day N days ago (IMAP `SINCE`: the server's arrival date, whole days). A message that leaves
  the window is simply no longer listed; nothing is deleted, and its UIDL does not change.
- `first_login = "from-now-on"`: at the device's first login (no state record of it yet) every
  message there is recorded as hidden in its per-device state (bridge.policy.device_state),
  so it sees only mail that arrives later. Under any delete policy; what it hid stays on the
  server for everyone else.

Both narrow what is listed before the session starts; DELE, the delete policies and UIDLs
work on what is listed as ever.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Protocol

from bridge.config.deletion import parse_window
from bridge.imap import MailboxSnapshot

_IMAP_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class Searchable(Protocol):
    async def search(self, folder: str, *criteria: str) -> list[int]: ...


def imap_date(day: date) -> str:
    """RFC 3501 date (`1-Nov-2026`), month names in English whatever the locale."""
    return f"{day.day}-{_IMAP_MONTHS[day.month - 1]}-{day.year}"


async def apply_window(
    mailbox: Searchable, folder: str, snapshot: MailboxSnapshot, window: str, today: date
) -> MailboxSnapshot:
    """The part of `snapshot` that `window` shows."""
    kind, count = parse_window(window)
    if kind == "all":
        return snapshot
    if kind == "messages":
        if len(snapshot.uids) <= count:
            return snapshot
        return MailboxSnapshot(snapshot.uidvalidity, snapshot.uids[-count:], snapshot.sizes[-count:])
    since = set(await mailbox.search(folder, "SINCE", imap_date(today - timedelta(days=count))))
    keep = [index for index, uid in enumerate(snapshot.uids) if uid in since]
    if len(keep) == len(snapshot.uids):
        return snapshot
    return MailboxSnapshot(
        snapshot.uidvalidity, [snapshot.uids[index] for index in keep], [snapshot.sizes[index] for index in keep]
    )
