"""What a client could not take at once, written out by one task per event loop, a bounded
slice of work per turn of the loop.

Why: a session whose client reads slowly (a device on a slow line, or the benchmark's 1,000
clients at 64 KiB/s) used to wait for room in the socket's buffer itself, and Linux gives a
slow reader's socket room a few KiB at a time. Every 16 KiB a client took woke its session
for one more write, and the sessions whose clients had read since the last look all ran in
the same turn of Trio's scheduler: hundreds of them in one turn, tens of milliseconds during
which a command from any other client of the worker waited for its turn. The pump keeps the
waiting sockets in an epoll set of its own (Trio's loop waits for that set's descriptor),
writes at most `slice_seconds` worth per turn and then lets the other tasks run; a session
sleeps until all of its data is out and wakes once for it. See docs/design.md.

The pump only writes. Who owns a socket never changes: the session's task waits in `write`
until its data is out, and its socket stays registered exactly that long (a cancelled wait
takes it out at once), so the pump never holds a descriptor number that may have been
closed and given to another connection. Errors of a write go to that session alone.
"""

from __future__ import annotations

import contextlib
import os
import select
import time
from collections.abc import Callable

import trio

# How long the pump writes before it lets the other tasks of its loop run. A few dozen
# writes of a slow reader's few KiB; what is left is ready again at the pump's next turn.
SLICE_SECONDS = 0.001
# Ready sockets asked of the epoll set per slice: about as many as a slice writes. The set is
# level-triggered, so the kernel checks again every socket it reports; asking for hundreds
# when a slice serves a few dozen made each turn of the loop check hundreds of sockets that
# had to wait for a later one (the first seconds of 1,000 slow downloads, when all of them
# have room at once: docs/performance.md). The kernel reports the rest at the next look.
READY_PER_SLICE = 32


class _Job:
    """One session's write in progress: `view` (or `length` bytes of the file `source` from
    `offset`) to the socket `fd`."""

    __slots__ = ("fd", "view", "source", "offset", "length", "task", "progressed", "error")

    def __init__(self, fd: int, task: trio.lowlevel.Task, progressed: Callable[[], None]) -> None:
        self.fd = fd
        self.view: memoryview | None = None
        self.source = -1
        self.offset = 0
        self.length = 0
        self.task: trio.lowlevel.Task | None = task
        self.progressed = progressed
        self.error: BaseException | None = None

    def write_some(self) -> bool:
        """One write of what is left; True once nothing is (or it failed: `error`)."""
        try:
            if self.view is not None:
                self.view = self.view[os.write(self.fd, self.view):]
                done = not self.view
            else:
                sent = os.sendfile(self.fd, self.source, self.offset, self.length - self.offset)
                if not sent:
                    raise EOFError("file ended early")
                self.offset += sent
                done = self.offset >= self.length
        except BlockingIOError:
            return False
        except (OSError, EOFError) as exc:
            self.error = exc
            return True
        if not done:
            self.progressed()
        return done


class WritePump:
    """Writes for sessions of one Trio run; `run` is its task (see `write_pump`)."""

    def __init__(self, slice_seconds: float = SLICE_SECONDS) -> None:
        self.slice_seconds = slice_seconds
        self._epoll = select.epoll()
        self._jobs: dict[int, _Job] = {}

    async def write(self, fd: int, data: memoryview, progressed: Callable[[], None]) -> None:
        """All of `data` to the socket `fd` (non-blocking, owned by the caller until this
        returns). `progressed` is called after each write that took some but not all of it.
        Raises the write's OSError if one fails."""
        job = _Job(fd, trio.lowlevel.current_task(), progressed)
        job.view = data
        await self._wait_for(job)

    async def send_file(self, fd: int, source: int, offset: int, length: int, progressed: Callable[[], None]) -> None:
        """Bytes `offset` to `length` of the file `source` to the socket `fd`, with sendfile.
        Raises EOFError if the file ends before `length`, the OSError of a failed write."""
        job = _Job(fd, trio.lowlevel.current_task(), progressed)
        job.source, job.offset, job.length = source, offset, length
        await self._wait_for(job)

    async def _wait_for(self, job: _Job) -> None:
        stale = self._jobs.get(job.fd)
        if stale is not None:
            # Only a socket closed while its own session waited here leaves its number behind:
            # that session learns its connection is gone, and the number is the new socket's.
            self._finish(stale, trio.ClosedResourceError("client connection closed during a write"))
        try:
            self._epoll.register(job.fd, select.EPOLLOUT)
        except FileExistsError:
            self._epoll.modify(job.fd, select.EPOLLOUT)
        self._jobs[job.fd] = job

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._forget(job)
            job.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if job.error is not None:
            raise job.error

    def _forget(self, job: _Job) -> None:
        if self._jobs.get(job.fd) is job:
            del self._jobs[job.fd]
            # A socket closed already was taken out of the set by the kernel itself.
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(job.fd)

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        self._forget(job)
        if error is not None:
            job.error = error
        if job.task is not None:
            trio.lowlevel.reschedule(job.task)
            job.task = None

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                self.write_a_slice()
        finally:
            self.close()

    def close(self) -> None:
        """Ends every write still waiting (with ClosedResourceError) and closes the set."""
        for job in list(self._jobs.values()):
            self._finish(job, trio.ClosedResourceError("the write pump is closed"))
        self._epoll.close()

    def write_a_slice(self) -> None:
        """One turn's work: writes to the sockets with room until `slice_seconds` are up
        (at least one write). `run` calls it each time the epoll set is ready."""
        # Level-triggered: a socket not served in this slice is ready again at the next.
        give_up = time.perf_counter() + self.slice_seconds
        for fd, _events in self._epoll.poll(0, READY_PER_SLICE):
            job = self._jobs.get(fd)
            if job is None:
                # Never the case; left in the set, a socket with room would be ready forever.
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
            elif job.write_some():
                self._finish(job)
            if time.perf_counter() > give_up:
                return


_PUMP: trio.lowlevel.RunVar[WritePump | None] = trio.lowlevel.RunVar("write_pump")


def write_pump() -> WritePump | None:
    """This Trio run's pump, its task started on first use; None without epoll (not Linux),
    where sessions wait for their sockets themselves."""
    try:
        return _PUMP.get()
    except LookupError:
        pass
    pump = WritePump() if hasattr(select, "epoll") else None
    _PUMP.set(pump)
    if pump is not None:
        # A system task: it serves every session of the run and ends with the run.
        trio.lowlevel.spawn_system_task(pump.run, name="bridge.net.write_pump")
    return pump
