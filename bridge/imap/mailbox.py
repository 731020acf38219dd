"""The mailbox operations the bridge needs, written once over an engine's `ImapChannel`.

`ImapMailbox` is the maildrop store the session uses and the state backend of the per-device
state: login (the mechanism chosen from what the server offers), the snapshot, reading and
changing messages by UID, and the folder operations. Engines differ only below the channel.

The snapshot. After the first full listing a connection that follows untagged responses
(`channel.keeps_listing`, the trio engine) keeps a *warm listing* (bridge.imap.listing), and a
later snapshot costs one round trip: `UID FETCH 1:* (...) (CHANGEDSINCE m)` after a QRESYNC
SELECT, the same after NOOP + SELECT with CONDSTORE, else NOOP + SELECT + `UID FETCH <last+1>:*`,
each followed by a count check. Any doubt (a count that does not add up, an unknown sequence
number) falls back to the full listing, so the snapshot is always the mailbox as it is then.
`keep_alive()` holds a parked connection with IDLE (RFC 2177) or NOOP (bridge.imap.pool).

Changing by UID always happens in the folder the session's snapshot was taken in: the
maildrop is selected afresh first (`_confirm_maildrop`), and a changed UIDVALIDITY refuses.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from bridge.config import UpstreamSettings
from bridge.imap import bearer, syntax
from bridge.imap.channel import Command, ImapChannel, Reply, StopSignal, TlsSession
from bridge.imap.errors import AuthenticationFailed, MessageGone, UpstreamError
from bridge.imap.interface import ChunkedRangeReader, RangeReader
from bridge.imap.limits import (
    HEADER_FETCH_LIMIT,
    MAX_BODY_FETCH_BYTES,
    MAX_OTHER_LITERAL_BYTES,
    TEXT_FETCH_LIMIT,
)
from bridge.imap.listing import MaildropListing
from bridge.imap.snapshot import MailboxSnapshot
from bridge.ops.logs import get_logger

_log = get_logger(component="upstream")

# Codes (RFC 5530) with which a server says "not now" rather than "wrong password".
_TEMPORARY_AUTH_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "CONTACTADMIN"})
_LISTING_ITEMS = b"(UID RFC822.SIZE FLAGS)"
# Mail delivered while a full listing runs is announced after it: list that too, a few
# rounds only (delivery may go on).
_CATCH_UP_ROUNDS = 3
# Logging out is a courtesy (the server logs a clean logout): never longer than this.
_LOGOUT_GRACE_SECONDS = 2.0


class ImapMailbox:
    def __init__(self, channel: ImapChannel, settings: UpstreamSettings) -> None:
        self._channel = channel
        self._settings = settings
        self._lock = trio.Lock()
        self._selected: str | None = None
        # The maildrop's UIDVALIDITY when the last snapshot was taken: the session's UIDs mean
        # something only within it.
        self._snapshot_uidvalidity: int | None = None
        self._listing_modseq: int | None = None
        self._qresync = self._condstore = False

    @property
    def capabilities(self) -> frozenset[str]:
        return self._channel.view.capabilities - self._settings.ignore_capabilities_set

    @property
    def usable(self) -> bool:
        return self._channel.usable

    @property
    def abandoned(self) -> bool:
        """Closed by the bridge because a command was given up half-way, not broken."""
        return self._channel.abandoned

    @property
    def offered_capabilities(self) -> frozenset[str]:
        """What the server advertised, upstream.ignore_capabilities not taken off."""
        return self._channel.view.capabilities

    def tls_session(self) -> TlsSession | None:
        return self._channel.tls_session()

    async def ask_capabilities(self) -> None:
        """CAPABILITY, unless the server already said (its greeting may carry them)."""
        if not self._channel.view.capabilities:
            await self._checked("capability", Command(b"CAPABILITY"))

    async def _run(
        self, what: str, command: Command, *, literal: bytes | None = None,
        literal_budget: int = MAX_OTHER_LITERAL_BYTES, collect: bool = False, secret: bool = False,
    ) -> Reply:
        return await self._channel.run(
            what, command, literal=literal, literal_budget=literal_budget, collect=collect, secret=secret
        )

    async def _checked(
        self, what: str, command: Command, *, literal: bytes | None = None, collect: bool = False
    ) -> Reply:
        """`_run`, then UpstreamError unless the server answered OK."""
        return (await self._run(what, command, literal=literal, collect=collect)).require(what)

    # -- logging in --------------------------------------------------------------------------

    async def log_in(self, username: str, password: str) -> None:
        """Authenticate as the POP3 user. Raises AuthenticationFailed, or UpstreamError when
        the server says "not now" (RFC 5530 codes) or fails otherwise."""
        if not self._channel.view.capabilities:
            await self._checked("capability", Command(b"CAPABILITY"))
        if {"AUTH=PLAIN", "SASL-IR"} <= self.capabilities:
            # SASL PLAIN carries any byte sequence (RFC 4616); LOGIN's quoted strings cannot.
            token = base64.b64encode(
                b"\0" + username.encode("utf-8", "surrogateescape") + b"\0" + password.encode("utf-8", "surrogateescape")
            )
            command = Command(b"AUTHENTICATE", (b"PLAIN", token))
        else:
            try:
                quoted = [syntax.quote_string(text).encode("utf-8", "surrogateescape") for text in (username, password)]
            except ValueError:
                raise AuthenticationFailed("credentials cannot be sent to the server") from None
            command = Command(b"LOGIN", tuple(quoted))
        await self._logged_in(await self._run("login", command, secret=True))

    async def log_in_authorized(self, account: str, admin_login: str, password: str) -> None:
        """Authenticate as the server's administrator `admin_login` and act as `account`
        (SASL PLAIN's authorization identity, RFC 4616: Dovecot master users, Cyrus admins).
        Needs AUTH=PLAIN with SASL-IR; raises AuthenticationFailed when refused."""
        if not self._channel.view.capabilities:
            await self._checked("capability", Command(b"CAPABILITY"))
        if not {"AUTH=PLAIN", "SASL-IR"} <= self.capabilities:
            raise UpstreamError("admin login: the server offers no AUTH=PLAIN with SASL-IR")
        token = base64.b64encode(
            b"\0".join(text.encode("utf-8", "surrogateescape") for text in (account, admin_login, password))
        )
        await self._logged_in(await self._run("login", Command(b"AUTHENTICATE", (b"PLAIN", token)), secret=True))

    async def log_in_bearer(self, username: str, token: str, mechanism: str) -> None:
        """Authenticate as `username` with an OAuth2 access token: XOAUTH2 or OAUTHBEARER as
        `mechanism` (oauth2.mechanism) and the server's capabilities say, with SASL-IR when
        advertised (bridge.imap.bearer). An error challenge is answered as the mechanism
        requires and the server's NO read; a server may also answer NO without one
        (Microsoft 365). Raises AuthenticationFailed when the token is refused, UpstreamError
        when the server says "not now" or fails otherwise."""
        if not self._channel.view.capabilities:
            await self._checked("capability", Command(b"CAPABILITY"))
        caps = self.capabilities
        chosen = bearer.choose_mechanism(mechanism, caps)
        if chosen == bearer.OAUTHBEARER:
            initial = bearer.oauthbearer_response(username, token, self._settings.host, self._settings.port)
        else:
            initial = bearer.xoauth2_response(username, token)
        sasl_ir = "SASL-IR" in caps
        exchange = bearer.BearerExchange(chosen, initial, initial_sent=sasl_ir)
        args = (chosen.encode(), initial) if sasl_ir else (chosen.encode(),)
        reply = await self._channel.authenticate("login", Command(b"AUTHENTICATE", args), exchange.respond)
        _log.debug("upstream_bearer_login", mechanism=chosen, sasl_ir=sasl_ir, challenged=bool(exchange.challenges), result=reply.result)
        await self._logged_in(reply)

    async def _logged_in(self, reply: Reply) -> None:
        """The login's answer: refused (wrong credentials, or "not now"), or the session set up."""
        if not reply.ok:
            code = syntax.response_code(reply.text)
            if reply.result == "NO" and code not in _TEMPORARY_AUTH_CODES:
                raise AuthenticationFailed("upstream rejected the credentials")
            raise UpstreamError(f"login: server answered {reply.result} [{code}]")
        if b"[CAPABILITY" not in reply.status.upper():
            await self._checked("capability", Command(b"CAPABILITY"))
        if self._channel.keeps_listing:
            await self._enable_extensions()

    async def _enable_extensions(self) -> None:
        caps = self.capabilities
        if "ENABLE" not in caps:
            return
        if "QRESYNC" in caps:
            await self._checked("enable", Command(b"ENABLE", (b"QRESYNC",)))
            self._qresync = self._condstore = True
        elif "CONDSTORE" in caps:
            await self._checked("enable", Command(b"ENABLE", (b"CONDSTORE",)))
            self._condstore = True

    # -- selection and the listing ----------------------------------------------------------------

    async def _select(self, folder: str) -> None:
        view = self._channel.view
        self._selected = None
        view.listing = None
        view.forget_folder()
        await self._checked("select", Command(b"SELECT", (syntax.folder_argument(folder),)))
        self._selected = folder

    async def _ensure_selected(self, folder: str) -> None:
        if self._selected != folder:
            await self._select(folder)
            if folder == self._settings.mailbox:
                self._refuse_if_recreated()

    def adopt_snapshot(self, uidvalidity: int) -> None:
        """This connection now serves a session whose snapshot was taken on another one (it
        got this one back for its next command): its UIDs are only good under `uidvalidity`.
        Raises UpstreamError if the maildrop, as selected here, has another one."""
        self._snapshot_uidvalidity = uidvalidity
        if self._selected == self._settings.mailbox:
            self._refuse_if_recreated()

    def _refuse_if_recreated(self) -> None:
        if self._snapshot_uidvalidity is not None and self._channel.view.uidvalidity != self._snapshot_uidvalidity:
            # The folder was recreated since the snapshot: its UIDs now name other messages,
            # which must be neither served nor deleted in the old ones' place.
            raise UpstreamError("maildrop UIDVALIDITY changed since the session's snapshot")

    async def _confirm_maildrop(self) -> None:
        """Select the maildrop afresh and make sure it is still the folder the session's
        snapshot was taken in, before changing anything in it by UID. A server may keep a
        session's view of a folder that another client deleted and recreated (Dovecot 2.3
        does: NOOP, STATUS and UIDVALIDITY stay the old ones) and then apply the old UIDs to
        the new folder's messages; only a new SELECT reads the folder as it is now. The price
        is one SELECT per QUIT that changes something (the warm listing is rebuilt at the next
        snapshot)."""
        await self._select(self._settings.mailbox)
        self._refuse_if_recreated()

    async def snapshot(self) -> MailboxSnapshot:
        async with self._lock:
            view = self._channel.view
            warm = view.listing is not None and self._selected == self._settings.mailbox
            if not (warm and await self._refresh_listing()):
                await self._full_listing()
            assert view.listing is not None and view.uidvalidity is not None
            self._snapshot_uidvalidity = view.uidvalidity
            snapshot = view.listing.snapshot(view.uidvalidity)
            if not self._channel.keeps_listing:
                # What this engine does not follow between commands cannot stay warm.
                view.listing = None
            return snapshot

    async def _full_listing(self) -> None:
        view = self._channel.view
        await self._select(self._settings.mailbox)
        if view.uidvalidity is None:
            raise UpstreamError("select: server sent no UIDVALIDITY")
        listing = view.listing = MaildropListing()
        listing.exists(view.exists)
        view.modseq_seen = None
        self._listing_modseq = view.highest_modseq if self._condstore else None
        if view.exists:
            await self._checked("listing", Command(b"FETCH", (b"1:*", _LISTING_ITEMS), uid=True))
        for _round in range(_CATCH_UP_ROUNDS):
            missing = listing.first_missing()
            if missing is None or not listing.consistent:
                break
            await self._checked("listing", Command(b"FETCH", (b"%d:*" % missing, _LISTING_ITEMS)))
        if not listing.complete():
            view.listing = None
            raise UpstreamError("listing: server did not list every message")

    async def _refresh_listing(self) -> bool:
        """Bring the warm listing up to date in one round trip; False if it cannot be trusted.

        The maildrop is selected afresh (a parked connection's view of it may be stale: a
        folder deleted and re-created under it keeps its old view), with commands pipelined:
        - QRESYNC: SELECT (QRESYNC (uidvalidity modseq)) reports what vanished since, and
          UID FETCH 1:* (...) (CHANGEDSINCE modseq) what changed or arrived, with sizes;
        - CONDSTORE: NOOP first (expunges pending for the old view), then the same without
          the QRESYNC parameter;
        - neither: NOOP, SELECT, UID FETCH <last UID + 1>:*.
        A changed UIDVALIDITY, a count that does not match EXISTS, or a listing that no longer
        lines up with the server's numbering means a full listing instead."""
        view = self._channel.view
        listing = view.listing
        assert listing is not None
        folder = syntax.folder_argument(self._settings.mailbox)
        uidvalidity, since = view.uidvalidity, self._listing_modseq
        commands: list[Command] = []
        if self._qresync and since is not None:
            commands.append(Command(b"SELECT", (folder, b"(QRESYNC (%d %d))" % (uidvalidity or 0, since))))
        else:
            commands += [Command(b"NOOP"), Command(b"SELECT", (folder, b"(CONDSTORE)") if self._condstore else (folder,))]
        if self._condstore and since is not None:
            commands.append(Command(b"FETCH", (b"1:*", _LISTING_ITEMS, b"(CHANGEDSINCE %d)" % since), uid=True))
        else:
            commands.append(Command(b"FETCH", (b"%d:*" % (listing.highest_uid() + 1), _LISTING_ITEMS), uid=True))
        self._selected = None
        view.forget_folder()
        replies = await self._channel.pipeline("listing", commands)
        if not all(reply.ok for reply in replies):
            return False
        self._selected = self._settings.mailbox
        if view.uidvalidity is None or view.uidvalidity != uidvalidity:
            return False
        if self._condstore:
            self._listing_modseq = view.highest_modseq
        # The count check: every message the server says exists is known, and no more.
        return listing.consistent and len(listing) == view.exists and listing.complete()

    # -- parking (bridge.imap.pool) ------------------------------------------------------------

    async def keep_alive(self, stop: StopSignal, interval: float) -> None:
        """Hold the connection until `stop` is set: IDLE re-issued every `interval` seconds
        where the engine and the server can (the maildrop stays selected and its listing
        warm), else NOOP every `interval` seconds."""
        channel = self._channel
        async with self._lock:
            if channel.keeps_listing and (channel.view.listing is None or self._selected != self._settings.mailbox):
                await self._full_listing()
            while not stop.is_set():
                if channel.keeps_listing and "IDLE" in self.capabilities:
                    await channel.idle(stop, interval)
                    continue
                with trio.move_on_after(interval):
                    await stop.wait()
                if not stop.is_set():
                    await self._checked("noop", Command(b"NOOP"))

    # -- reading messages ------------------------------------------------------------------------

    async def fetch_range(self, uid: int, offset: int, length: int) -> bytes:
        async with self._lock:
            await self._ensure_selected(self._settings.mailbox)
            items = b"(UID BODY.PEEK[]<%d.%d>)" % (offset, length)
            reply = await self._run(
                "fetch", Command(b"FETCH", (b"%d" % uid, items), uid=True),
                literal_budget=length + MAX_OTHER_LITERAL_BYTES, collect=True,
            )
        data = syntax.body_section(reply.responses, uid)
        if data is None:
            if reply.result in ("OK", "NO"):
                raise MessageGone(f"UID {uid} no longer exists")
            raise UpstreamError(f"fetch: server answered {reply.result}")
        reply.require("fetch")
        return data

    @asynccontextmanager
    async def open_range(self, uid: int, offset: int, length: int) -> AsyncIterator[RangeReader]:
        if not self._channel.streams_bodies:
            yield ChunkedRangeReader(self, uid, offset, length, self._settings.fetch_chunk)
            return
        async with self._lock:
            await self._ensure_selected(self._settings.mailbox)
            async with self._channel.stream_body(uid, offset, length) as reader:
                yield reader

    async def fetch_messages(self, uids: Sequence[int]) -> dict[int, bytes]:
        return await self._fetch_sections(self._settings.mailbox, uids, b"BODY.PEEK[]", MAX_BODY_FETCH_BYTES)

    async def fetch_headers(self, uids: Sequence[int]) -> dict[int, bytes]:
        """The header (BODY[HEADER], at most HEADER_FETCH_LIMIT bytes) of maildrop messages."""
        item = b"BODY.PEEK[HEADER]<0.%d>" % HEADER_FETCH_LIMIT
        return await self._fetch_sections(self._settings.mailbox, uids, item, HEADER_FETCH_LIMIT)

    async def fetch_emailids(self, uids: Sequence[int]) -> dict[int, str]:
        """RFC 8474 EMAILIDs of maildrop messages (the server has OBJECTID)."""
        found: dict[int, str] = {}
        if not uids:
            return found
        async with self._lock:
            await self._ensure_selected(self._settings.mailbox)
            for piece in syntax.chunked_uid_sets(uids):
                command = Command(b"FETCH", (piece, b"(UID EMAILID)"), uid=True)
                reply = await self._checked("fetch", command, collect=True)
                found.update(syntax.emailids_by_uid(reply.responses))
        return found

    async def fetch_texts(self, folder: str, uids: Sequence[int]) -> dict[int, bytes]:
        """BODY[TEXT] of small messages (state records), at most TEXT_FETCH_LIMIT bytes of each."""
        per_message = TEXT_FETCH_LIMIT
        return await self._fetch_sections(folder, uids, b"BODY.PEEK[TEXT]<0.%d>" % per_message, per_message)

    async def _fetch_sections(self, folder: str, uids: Sequence[int], item: bytes, per_message: int) -> dict[int, bytes]:
        if not uids:
            return {}
        found: dict[int, bytes] = {}
        async with self._lock:
            await self._ensure_selected(folder)
            for piece in syntax.chunked_uid_sets(uids):
                command = Command(b"FETCH", (piece, b"(UID " + item + b")"), uid=True)
                count = sum(high - low + 1 for low, high in syntax.uid_set_ranges(piece))
                budget = min(MAX_BODY_FETCH_BYTES, per_message * count) + MAX_OTHER_LITERAL_BYTES
                reply, bodies = await self._channel.fetch_bodies("fetch", command, budget)
                reply.require("fetch")
                found.update(bodies)
        return found

    # -- changing messages and folders --------------------------------------------------------------

    async def _remove_selected(self, uids: Sequence[int]) -> None:
        """Flag exactly `uids` of the selected folder \\Deleted and expunge exactly them."""
        pieces = syntax.chunked_uid_sets(uids)
        for piece in pieces:
            await self._checked("store", Command(b"STORE", (piece, b"+FLAGS.SILENT", b"(\\Deleted)"), uid=True))
        if "UIDPLUS" in self.capabilities:
            for piece in pieces:
                await self._checked("expunge", Command(b"EXPUNGE", (piece,), uid=True))
        # Without UIDPLUS a plain EXPUNGE would also remove messages other clients flagged;
        # the messages stay flagged \Deleted (docs/design.md, "Deletion, exactly").

    async def delete(self, uids: Sequence[int]) -> None:
        if uids:
            async with self._lock:
                await self._confirm_maildrop()
                await self._remove_selected(uids)

    async def add_flags(self, uids: Sequence[int], flags: str) -> None:
        if uids:
            async with self._lock:
                await self._confirm_maildrop()
                for piece in syntax.chunked_uid_sets(uids):
                    command = Command(b"STORE", (piece, b"+FLAGS.SILENT", b"(" + flags.encode("ascii") + b")"), uid=True)
                    await self._checked("store", command)

    async def move(self, uids: Sequence[int], folder: str) -> None:
        if not uids:
            return
        await self.ensure_folder(folder)
        target = syntax.folder_argument(folder)
        async with self._lock:
            await self._confirm_maildrop()
            if "MOVE" in self.capabilities:
                for piece in syntax.chunked_uid_sets(uids):
                    await self._checked("move", Command(b"MOVE", (piece, target), uid=True))
                _log.debug("messages_moved", count=len(uids), method="MOVE")
                return
            # RFC 6851's fallback for exactly these UIDs: a failed copy flags nothing; a failed
            # expunge leaves the originals (flagged), never lost.
            for piece in syntax.chunked_uid_sets(uids):
                await self._checked("copy", Command(b"COPY", (piece, target), uid=True))
            await self._remove_selected(uids)
        _log.debug("messages_moved", count=len(uids), method="COPY")

    async def ensure_folder(self, folder: str) -> None:
        name = syntax.folder_argument(folder)
        async with self._lock:
            if (await self._run("create", Command(b"CREATE", (name,)))).ok:
                return
            # [ALREADYEXISTS] is RFC 5530; older servers just say NO. STATUS tells for sure.
            await self._checked("status", Command(b"STATUS", (name, b"(UIDNEXT)")))

    async def append(self, folder: str, message: bytes) -> tuple[int, int] | None:
        """APPEND to `folder`; (UIDVALIDITY, UID) of the new message when the server says
        (UIDPLUS's APPENDUID), else None."""
        async with self._lock:
            reply = await self._checked("append", Command(b"APPEND", (syntax.folder_argument(folder),)), literal=message)
        return syntax.appended_uid(reply.text)

    async def folder_status(self, folder: str) -> tuple[int, int, int] | None:
        """(UIDVALIDITY, UIDNEXT, MESSAGES) of a folder that is not the maildrop, without
        selecting it (the maildrop stays selected); None if the folder does not exist."""
        command = Command(b"STATUS", (syntax.folder_argument(folder), b"(UIDVALIDITY UIDNEXT MESSAGES)"))
        async with self._lock:
            reply = await self._run("status", command, collect=True)
        if reply.result == "NO":
            return None
        reply.require("status")
        items = syntax.status_items(reply.responses)
        try:
            return items["UIDVALIDITY"], items["UIDNEXT"], items["MESSAGES"]
        except KeyError:
            raise UpstreamError("status: server left out UIDVALIDITY, UIDNEXT or MESSAGES") from None

    async def search(self, folder: str, *criteria: str) -> list[int]:
        """UID SEARCH in `folder`; criteria are IMAP search keys, strings already quoted."""
        async with self._lock:
            if self._selected == folder:
                # A selected folder shows what other sessions appended only after a command
                # that syncs it (NOOP does; Dovecot's CREATE and STATUS do not), and SEARCH
                # answers from this session's view: without the NOOP it misses new messages.
                await self._checked("noop", Command(b"NOOP"))
            else:
                await self._select(folder)
            keys = tuple(criterion.encode("utf-8") for criterion in criteria)
            reply = await self._checked("search", Command(b"SEARCH", keys, uid=True), collect=True)
        return syntax.search_results(reply.responses)

    async def delete_in(self, folder: str, uids: Sequence[int]) -> None:
        """`delete` for another folder than the maildrop."""
        if uids:
            async with self._lock:
                await self._ensure_selected(folder)
                await self._remove_selected(uids)

    async def aclose(self) -> None:
        """Log out (best effort, bounded in time) and close the connection."""
        if self._channel.usable:
            with trio.CancelScope(shield=True), trio.move_on_after(_LOGOUT_GRACE_SECONDS):
                async with self._lock:
                    await self._channel.logout()
        self._channel.close()
