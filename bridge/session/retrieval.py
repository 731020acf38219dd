"""RETR and TOP: a message from the upstream to the POP3 client, dot-stuffed by the core.

How the first piece is found decides the cost:
- a client downloading in order finds its next RETR answered in advance: once a message went
  out, the reply to the next one is made from the read-ahead (`Pop3Server.prepare_retrieve`)
  while the client is still reading, and goes out the moment the command arrives
  (`send_prepared`). A reply that takes longer than a few microseconds to start costs far
  more than its own time: the client's CPU has gone idle by then, and waking it is what a
  small RETR's round trip mostly spends (docs/performance.md);
- a client downloading in order (1, 2, 3, ...) gets the next small messages read ahead
  (`bridge.session.readahead`): a download of 1,000 small messages seldom waits for the
  upstream at all;
- any other RETR is one partial FETCH of the whole message whose literal is passed on as it
  arrives (memory stays flat however big the message);
- TOP reads `fetch_chunk` pieces (it usually ends within the first);
- a big message the client reads slower than the upstream sends it is spooled: the rest is
  read at once into the message cache's file, the IMAP connection goes back, and the file is
  sent with sendfile while the client reads (`bridge.session.message_cache`).

A message in hand goes out with its status line and terminator in one write. If the upstream
fails after part of a body went out, the connection is dropped (`EndSession`): a terminator
would pass a truncated message off as whole.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from bridge.config import UpstreamSettings
from bridge.imap import ChunkedRangeReader, MaildropStore, MessageGone, RangeReader, UpstreamError
from bridge.net.client_stream import SEND_PIECE
from bridge.ops import metrics
from bridge.ops.logs import get_logger
from bridge.pop3 import MessageEncoder, Pop3Server, PreparedRetrieve, ResponseCode, RetrieveRequest
from bridge.session.errors import EndSession
from bridge.session.message_cache import AccountCache, CacheWriter
from bridge.session.readahead import Readahead
from bridge.session.upstream import StoreAccess

_log = get_logger()
# Bounds of the pieces a streamed RETR reads from the upstream at a time. A message starts at
# _SLOW_PIECE; a client that keeps up gets up to _FAST_PIECE per read, one that makes sends
# wait goes back down (a thousand slow clients then hold tens of MB between them, not GB).
# Every piece costs a read, a stuffing, a write and a few turns of the event loop whatever
# its size, so for many slow clients the smaller piece costs CPU (docs/performance.md).
_FAST_PIECE = 1 << 20
_SLOW_PIECE = 64 * 1024
# A spool reads at the upstream's pace into a file: bigger pieces cost fewer turns, and few
# spools read at once (bridge.session.message_cache).
_SPOOL_PIECE = 256 * 1024
# A piece that took this long to go out came from a client far slower than the upstream: it
# reads at its own pace from the spool, without an IMAP connection or a wake-up per piece. A
# fast client whose send waited a moment is better served by the stream, which reads the
# next piece while the client takes the last.
_SPOOL_AFTER_SECONDS = 0.05
_READAHEAD_HITS = metrics.READAHEAD_HITS


@dataclass(frozen=True)
class _Unspooled:
    """What a spool's file did not take (`rest`, wire form), how far the message was read,
    whether the upstream has more of it, and whether `rest` ends with the terminator."""

    rest: bytes
    offset: int
    more: bool
    finished: bool = False


class FileSender(Protocol):
    """Sends bytes [start, length) of an open file to the session's client, `piece_size`
    at a time (the session's `_send_file`)."""

    async def __call__(self, fd: int, length: int, start: int = 0, piece_size: int = SEND_PIECE) -> None: ...


class Retriever:
    def __init__(
        self, core: Pop3Server, upstream: StoreAccess, readahead: Readahead, settings: UpstreamSettings,
        send: Callable[[bytes], Awaitable[bool | None]], command_log: Any,
        cache: AccountCache | None = None, send_file: FileSender | None = None,
        backend: str = "default",
    ) -> None:
        self._core = core
        self._cache = cache
        self._send_file = send_file
        self._upstream = upstream
        self.readahead = readahead
        self._chunk = settings.fetch_chunk
        self._send = send
        # A logger for the per-command debug event, or None below debug level.
        self._command_log = command_log
        self._backend = backend  # the metrics label of its upstream failures
        self._last_retrieved = 0
        self._sequential = False
        self._piece = _SLOW_PIECE
        # The reply to the RETR a client downloading in order sends next, made in advance.
        self.prepared: PreparedRetrieve | None = None

    async def send_prepared(self) -> None:
        """The core took the client's command as `prepared`'s RETR (`take_prepared`): its
        reply goes out, then the next one is made while the client reads this."""
        prepared = self.prepared
        assert prepared is not None
        self._forget_prepared()
        with metrics.CommandTimer("RETR", self._command_log):
            await self._send(prepared.reply)
        self._answered_in_advance(prepared.number)
        self._prepare(prepared.number + 1)

    def close(self) -> None:
        """The session is over: what it holds goes back to the read-ahead budget."""
        self._forget_prepared()
        self.readahead.close()

    async def retrieve(self, request: RetrieveRequest) -> None:
        entry = request.entry
        command = "RETR" if request.body_lines is None else "TOP"
        with metrics.CommandTimer(command, self._command_log) as timing:
            try:
                if await self._sent_prepared(request):
                    pass
                elif (data := self._in_hand(request)) is not None:
                    await self._send_whole(data)
                elif not await self._sent_from_cache(request):
                    async with self._upstream.using() as store:
                        spool = await self._retrieve_from(store, request)
                    if spool is not None:
                        await self._send_spooled(*spool, entry.ref)
            except MessageGone:
                _log.info("message_gone", uid=entry.ref, number=request.number)
                timing.value = "err"
                await self._send(self._core.refuse_message(f"message {request.number} was removed from the mailbox"))
            except UpstreamError as exc:
                _log.warning("upstream_error", command=command, error=str(exc))
                metrics.backend_error(self._backend, "retrieve").inc()
                timing.value = "err"
                await self._send(self._core.refuse_message("mail server unavailable, try again later", ResponseCode.SYS_TEMP))
        if request.body_lines is None and self._sequential and timing.value == "ok":
            self._prepare(request.number + 1)

    async def _sent_prepared(self, request: RetrieveRequest) -> bool:
        """A RETR the core handed over as usual (a pipelined one, say) of the message whose
        reply was made in advance: that reply, as the core's encoder made it."""
        prepared = self.prepared
        if prepared is None:
            return False
        self._forget_prepared()
        if request.body_lines is not None or request.number != prepared.number or request.entry != prepared.entry:
            return False
        core = self._core
        core.start_message()  # the status line is the reply's first line
        await self._send(prepared.reply)
        core.end_cached_message()
        self._answered_in_advance(request.number)
        return True

    def _answered_in_advance(self, number: int) -> None:
        # A read-ahead hit like any other, and the download's order goes on from `number`.
        _READAHEAD_HITS.inc()
        self._sequential = True
        self._last_retrieved = number

    def _prepare(self, number: int) -> None:
        """The reply to RETR `number`, made now if the message is in hand."""
        data = self.readahead.take_number(number)
        if data is None:
            return
        prepared = self._core.prepare_retrieve(number, data)
        if prepared is not None and self.readahead.hold(len(prepared.reply)):
            self.prepared = prepared

    def _forget_prepared(self) -> None:
        if self.prepared is not None:
            self.readahead.let_go(len(self.prepared.reply))
            self.prepared = None

    def _in_hand(self, request: RetrieveRequest) -> bytes | None:
        """The message, if it needs no upstream: empty, or read ahead already."""
        entry = request.entry
        # A session's first RETR starts an order too: a device that keeps mail on the server
        # downloads only its new messages, from wherever they begin.
        self._sequential = request.number == self._last_retrieved + 1 or not self._last_retrieved
        self._last_retrieved = request.number
        if not entry.size:
            return b""
        return self._from_readahead(entry.ref)

    def _from_readahead(self, uid: int) -> bytes | None:
        data = self.readahead.take(uid)
        if data is not None:
            _READAHEAD_HITS.inc()
        return data

    async def _retrieve_from(self, store: MaildropStore, request: RetrieveRequest) -> tuple[CacheWriter, int] | None:
        """Sends the message, or returns a spool (its writer and how much of the file went
        out already) for the caller to send once the connection is let go."""
        entry = request.entry
        data = await self._first_piece(store, request)
        if data is not None and len(data) >= entry.size:
            await self._send_whole(data)
        elif data is not None:
            rest = ChunkedRangeReader(store, entry.ref, len(data), entry.size - len(data), self._chunk)
            await self._send_message(request, data, rest)
        else:
            writer = self._cache_writer(request)
            # Each streamed message starts small: until a send has shown how fast the client
            # reads, a piece is all a stalled client makes the bridge hold.
            self._piece = _SLOW_PIECE
            spool, handed_over = None, False
            try:
                async with store.open_range(entry.ref, 0, entry.size) as reader:
                    spool = await self._send_message(request, await reader.next_piece(self._piece), reader, writer)
                handed_over = spool is not None
                return spool
            except (MessageGone, UpstreamError) as exc:
                if spool is None:
                    raise
                # The whole message is in the spool, but the connection failed as the FETCH
                # ended, and part of the message went out already.
                raise self._failed_mid_message(request, entry.size, exc) from None
            finally:
                if writer is not None and not handed_over:
                    writer.abort()
        return None

    async def _first_piece(self, store: MaildropStore, request: RetrieveRequest) -> bytes | None:
        """The first piece of a message not in hand: from the batch being read ahead, or one
        batched FETCH of this and the following small messages when the client reads them in
        order, or for TOP a partial FETCH of the first chunk. None: a RETR to stream. Raises
        MessageGone."""
        entry, readahead = request.entry, self.readahead
        # It may be in the batch being fetched; the FETCH of anything else would wait for
        # that batch's anyway.
        await readahead.settle()
        cached = self._from_readahead(entry.ref)
        if cached is not None:
            return cached
        if request.body_lines is not None:
            return await store.fetch_range(entry.ref, 0, min(self._chunk, entry.size))
        if self._sequential:
            return await readahead.fetch_from(entry, request.number)
        return None

    async def _send_whole(self, data: bytes) -> None:
        """The +OK line, the body and the terminator in one write: the message is in hand (a
        client downloading hundreds of small messages gets each in one piece)."""
        core = self._core
        status_line = core.start_message()
        encoder = core.message_body_encoder()
        await self._send(b"".join((status_line, encoder.feed(data), encoder.finish())))
        core.end_message()

    async def _sent_from_cache(self, request: RetrieveRequest) -> bool:
        """A RETR of a message kept in the message cache: the status line, then the kept wire
        form with sendfile. False: not kept (or not a RETR)."""
        cache, entry = self._cache_for(request), request.entry
        if cache is None:
            return False
        cached = cache.cache.get(cache.key(entry.ref), entry.size)
        if cached is None:
            return False
        core = self._core
        with cached:
            await self._send(core.start_message())
            try:
                await self._send_file(cached.fd, cached.length)
            except EOFError:
                raise self._cache_file_failed(entry.ref) from None
        core.end_cached_message()
        return True

    def _cache_writer(self, request: RetrieveRequest) -> CacheWriter | None:
        cache, entry = self._cache_for(request), request.entry
        if cache is None:
            return None
        return cache.cache.writer(cache.key(entry.ref), entry.size)

    def _cache_for(self, request: RetrieveRequest) -> AccountCache | None:
        """The message cache, if `request` is a RETR of a message big enough to keep."""
        cache = self._cache
        if cache is None or request.body_lines is not None or not cache.cache.worth_keeping(request.entry.size):
            return None
        return cache

    async def _send_message(
        self, request: RetrieveRequest, data: bytes, rest: RangeReader, writer: CacheWriter | None = None
    ) -> tuple[CacheWriter, int] | None:
        """The +OK line, the body (starting with `data`, which is in hand, then what `rest`
        reads) and the terminator; what went out after the status line also to `writer`,
        which keeps it once the whole message, as listed, went out. Returns a spool instead
        of sending the rest if the client turns out slow and `writer` may spool."""
        core, entry = self._core, request.entry
        pending = [core.start_message()]
        encoder = core.message_body_encoder()
        offset = 0
        while True:
            piece = encoder.feed(data)
            pending.append(piece)
            if writer is not None:
                writer.write(piece)
            offset += len(data)
            if encoder.done or offset >= entry.size or not data:
                break
            # Only its stuffed form is needed from here: a slow client's session holds one
            # copy of a piece while its send waits, not two.
            del data
            # More to fetch: what we have goes out first, so the client is never kept
            # waiting on the upstream for bytes we already hold.
            sending = trio.current_time()
            slow = await self._send_pieces(pending)
            pending.clear()
            if (
                slow and writer is not None and self._send_file is not None
                and trio.current_time() - sending >= _SPOOL_AFTER_SECONDS and writer.start_spool()
            ):
                sent = writer.length
                _log.debug("retrieve_spooled", uid=entry.ref, sent=sent)
                try:
                    left = await self._spool(request, encoder, rest, writer, offset)
                finally:
                    writer.fetched()
                if left is None:
                    return writer, sent
                # The file could not take it all: what it holds goes out from it, the rest
                # from memory, and the message goes on as a stream.
                await self._send_spool_file(writer, sent, entry.ref)
                writer.abort()
                writer = None
                pending.append(left.rest)
                offset = left.offset
                if left.finished:
                    await self._send_pieces(pending)
                    core.end_message()
                    return None
                data = await self._next_piece(rest, request, offset, _SLOW_PIECE) if left.more else b""
                continue
            # A client slower than the upstream gets the rest in small pieces, so its RETR
            # holds little memory however long it takes; a fast one in big ones.
            self._piece = max(_SLOW_PIECE, self._piece // 4) if slow else min(_FAST_PIECE, self._piece * 4)
            data = await self._next_piece(rest, request, offset, self._piece)
        pending.append(encoder.finish())
        await self._send_pieces(pending)
        core.end_message()
        if writer is not None and offset == entry.size:
            writer.write(pending[-1])
            writer.commit()
        return None

    async def _next_piece(self, rest: RangeReader, request: RetrieveRequest, offset: int, most: int) -> bytes:
        """The next piece of a message whose status line went out: an upstream failure now
        ends the session (a terminator would pass the part sent off as the whole)."""
        try:
            return await rest.next_piece(most)
        except (MessageGone, UpstreamError) as exc:
            raise self._failed_mid_message(request, offset, exc) from None

    def _failed_mid_message(self, request: RetrieveRequest, offset: int, exc: Exception) -> EndSession:
        self._core.abort_message()
        _log.warning("retrieve_aborted", uid=request.entry.ref, offset=offset, error=type(exc).__name__)
        metrics.backend_error(self._backend, "retrieve").inc()
        return EndSession("upstream_failed_mid_message")

    async def _spool(
        self, request: RetrieveRequest, encoder: MessageEncoder, rest: RangeReader, writer: CacheWriter, offset: int
    ) -> _Unspooled | None:
        """The rest of the message, terminator included, read into `writer`'s file as fast
        as the upstream sends it. None once it is all there."""
        size = request.entry.size
        while offset < size:
            data = await self._next_piece(rest, request, offset, _SPOOL_PIECE)
            if not data:
                break
            offset += len(data)
            piece = encoder.feed(data)
            del data
            written = writer.write(piece)
            if written < len(piece):
                return _Unspooled(piece[written:], offset, more=offset < size)
        if offset != size:
            # Shorter or longer than listed: never kept, so it ends as a stream would.
            return _Unspooled(b"", offset, more=False)
        tail = encoder.finish()
        written = writer.write(tail)
        return None if written == len(tail) else _Unspooled(tail[written:], offset, more=False, finished=True)

    async def _send_spooled(self, writer: CacheWriter, start: int, uid: int) -> None:
        """The rest of a spooled message, from its file; then it is kept."""
        try:
            await self._send_spool_file(writer, start, uid)
        except BaseException:
            writer.abort()
            raise
        self._core.end_message()
        writer.commit()

    async def _send_spool_file(self, writer: CacheWriter, start: int, uid: int) -> None:
        """What `writer`'s file holds from `start` on, to a client known to read slowly."""
        assert self._send_file is not None
        try:
            # (Over TLS the file is read into pieces: a slow reader's hold no more than a
            # streamed RETR's would.)
            await self._send_file(writer.fd, writer.length, start, _SLOW_PIECE)
        except EOFError:
            raise self._cache_file_failed(uid) from None

    def _cache_file_failed(self, uid: int) -> EndSession:
        # A file of the message cache shorter than it was written: part of the message went
        # out, so the session ends rather than pass it off as whole.
        self._core.abort_message()
        _log.error("message_cache_failed", uid=uid)
        return EndSession("upstream_failed_mid_message")

    async def _send_pieces(self, pieces: list[bytes]) -> bool:
        """True if the client was slower than the data."""
        # Small pieces are joined into one write; a big chunk of a message goes out as it
        # is rather than being copied once more only to sit next to a status line.
        if sum(len(piece) for piece in pieces) <= SEND_PIECE:
            return bool(await self._send(b"".join(pieces)))
        slow = False
        for piece in pieces:
            if piece:
                slow |= bool(await self._send(piece))
        return slow
