"""Slow clients at scale: plan.slow_clients devices, each on its own account, each reading a
RETR of plan.slow_size at plan.slow_rate bytes/s through a small receive buffer, while a fast
poller polls a small mailbox (login, STAT, UIDL, LIST, QUIT) every plan.poller_interval
seconds.

Measured, on the bridge and on Dovecot's own POP3: the fast poller's p95 with nothing else
running and while every slow client is reading (from the moment all have their RETR under
way to the moment the first one has its whole message), and whether every slow client got
all of its message; on the bridge also the peak growth of its RSS (VmHWM, reset before the
slow clients connect) over its RSS before.

The slow clients run in a child process (`python -m bench.slow_clients`, one Trio loop),
the poller in this one: sharing a process (and its GIL) would add the slow clients' work
to the poller's latency. They still share the machine's cores with the servers, so their
reading is one task for all of them (`PacedReaders`), as cheap as Python gets: on the real
network those devices would cost the server's machine nothing.

Accounts: one per slow client, as a device population would be, each with the same message
hard-linked into its maildir (one file on disk and in the page cache, however many
accounts). The row's bridge allows pool.max_connections = slow clients + 100: a slow
reader's session holds an IMAP connection through its RETR unless its message is spooled,
and with the cache's default budget (cache.max_bytes, 1 GiB) only about a quarter of these
4 MiB messages can be spooled at once.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import os
import select
import selectors
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from bench.asyncclient import AsyncPop3, BodyEnd
from bench.maildirs import message_file, write_accounts
from bench.plans import KIB, MIB, Plan, size_text
from bench.pop3client import Pop3Error, poll
from bench.proc import cpu_seconds, machine_busy_seconds, peak_rss_bytes, reset_peak, rss_bytes
from bench.report import Fact, Recorder, Row, progress
from bench.scenarios import Account, make_accounts, percentile
from bench.servers import BenchServers, Target
from sandbox import big_message, numbered_messages

# Slow clients logging in at once (then they all read at the same time).
_PARALLEL_LOGINS = 100
_ERRORS = (OSError, Pop3Error, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


# -- the child: the slow clients ---------------------------------------------------------------


def _say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class PacedReaders:
    """Reads every slow client's RETR body at its rate, from one task and one epoll set.

    Why not each client reading in its own task: a Trio sleep and a receive per read of a
    few KiB, 4,000 times a second for 1,000 clients, took this process most of a core, on
    a 2-core machine whose other core the measured server and the poller share.
    Here a read that is due costs one `os.read`; the client is the same (the same receive
    buffer and read size, no faster than the rate, and at its due time it takes what its
    socket holds, or waits for the first bytes)."""

    def __init__(self, rate: float, chunk: int) -> None:
        self._rate = rate
        self._chunk = chunk
        self._epoll = select.epoll()
        self._due: list[tuple[float, int, _Paced]] = []
        self._waiting: dict[int, _Paced] = {}
        self._order = itertools.count()
        self._sleep: trio.CancelScope | None = None

    async def read_body(self, session: AsyncPop3) -> int:
        """The body of the response whose status line `session` just read, at the rate; its
        length (bytes up to the terminator's dot)."""
        fd, held = session.hand_over()
        paced = _Paced(fd, trio.current_time(), trio.lowlevel.current_task())
        if not self._consume(paced, held):
            self._schedule(paced)

            def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
                paced.task = None
                self._unwait(paced)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        if paced.error is not None:
            raise paced.error
        session.take_back(paced.rest)
        return paced.body.total

    async def run(self) -> None:
        try:
            while True:
                now = trio.current_time()
                while self._due and self._due[0][0] <= now:
                    self._read(heapq.heappop(self._due)[2])
                for fd, _events in self._epoll.poll(0):
                    paced = self._waiting.pop(fd, None)
                    if paced is not None:
                        self._read(paced)
                with trio.CancelScope(deadline=self._due[0][0] if self._due else math.inf) as self._sleep:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
        finally:
            self._epoll.close()

    def _schedule(self, paced: _Paced) -> None:
        when = paced.started + paced.body.total / self._rate
        heapq.heappush(self._due, (when, next(self._order), paced))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    def _read(self, paced: _Paced) -> None:
        if paced.task is None:
            return  # given up (cancelled) while it waited
        try:
            data = os.read(paced.fd, self._chunk)
        except BlockingIOError:
            self._waiting[paced.fd] = paced
            try:
                self._epoll.register(paced.fd, select.EPOLLIN | select.EPOLLONESHOT)
            except FileExistsError:
                self._epoll.modify(paced.fd, select.EPOLLIN | select.EPOLLONESHOT)
            return
        except OSError as exc:
            self._finish(paced, exc)
            return
        if not data:
            self._finish(paced, Pop3Error("server closed the connection"))
        elif self._consume(paced, data):
            self._finish(paced, None)
        else:
            self._schedule(paced)

    @staticmethod
    def _consume(paced: _Paced, data: bytes) -> bool:
        """Feeds `data` to the body; True once it has ended."""
        end = paced.body.feed(data)
        if end is None:
            return False
        paced.rest = data[end[1]:]
        return True

    def _finish(self, paced: _Paced, error: BaseException | None) -> None:
        paced.error = error
        self._unwait(paced)
        if paced.task is not None:
            trio.lowlevel.reschedule(paced.task)
            paced.task = None

    def _unwait(self, paced: _Paced) -> None:
        if self._waiting.get(paced.fd) is paced:
            del self._waiting[paced.fd]
        # Registered once it had to wait for bytes (disabled, not removed, after each wait).
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(paced.fd)


class _Paced:
    __slots__ = ("fd", "started", "task", "body", "rest", "error")

    def __init__(self, fd: int, started: float, task: trio.lowlevel.Task) -> None:
        self.fd = fd
        self.started = started
        self.task: trio.lowlevel.Task | None = task
        self.body = BodyEnd()
        self.rest = b""
        self.error: BaseException | None = None


@contextlib.asynccontextmanager
async def paced_readers(rate: float, chunk: int) -> AsyncIterator[PacedReaders]:
    """`PacedReaders` with its task running until the block ends."""
    readers = PacedReaders(rate, chunk)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(readers.run)
        yield readers
        nursery.cancel_scope.cancel()


async def _clients(spec: dict[str, Any]) -> None:
    accounts = spec["accounts"]
    limiter = trio.CapacityLimiter(spec["parallel"])
    errors: Counter[str] = Counter()
    started = trio.Event()
    waiting = [len(accounts)]
    complete = [0]
    first_done = [False]
    retr = spec["action"] == "retr"

    def one_started() -> None:
        waiting[0] -= 1
        if waiting[0] == 0:
            started.set()

    async def client(user: str, password: str) -> None:
        session = None
        reading = False
        try:
            async with limiter:
                with trio.fail_after(120):
                    session = await AsyncPop3.connect(spec["host"], spec["port"], receive_buffer=spec["receive_buffer"])
                    await session.login(user, password)
                    await session.stat()
            if not retr:
                await session.quit()
                complete[0] += 1
                return
            reading = True
            one_started()
            # Slowest expected: the whole message at the rate, plus a minute.
            with trio.fail_after(spec["size"] / spec["rate"] + 60):
                await session.start_multiline(b"RETR 1")
                got = await pacer.read_body(session)
                if got < spec["size"]:
                    raise Pop3Error(f"RETR 1 sent {got} bytes, expected at least {spec['size']}")
                await session.quit()
            complete[0] += 1
            if not first_done[0]:
                first_done[0] = True
                _say("first_done")
        except _ERRORS as exc:
            errors[f"{type(exc).__name__}: {str(exc)[:100]}"] += 1
            if retr and not reading:
                one_started()
        finally:
            if session is not None:
                await session.aclose()

    async def announce() -> None:
        await started.wait()
        _say("ready", failed=sum(errors.values()))

    begun = time.perf_counter()
    async with paced_readers(spec["rate"], spec["receive_buffer"]) as pacer, trio.open_nursery() as nursery:
        if retr:
            nursery.start_soon(announce)
        for user, password in accounts:
            nursery.start_soon(client, user, password)
    _say(
        "done", complete=complete[0], errors=dict(errors.most_common(10)), seconds=time.perf_counter() - begun,
        cpu_seconds=time.process_time(),
    )


def child_main() -> int:
    trio.run(_clients, json.loads(sys.stdin.readline()))
    return 0


# -- the parent: the poller, the memory, the verdicts ------------------------------------------


def _unloaded_polls(target: Target, account: Account, plan: Plan) -> list[float]:
    samples = []
    for _ in range(plan.poller_baseline):
        seconds, _count = poll(target.host, target.port, account.user, account.password)
        samples.append(seconds)
        time.sleep(max(0.0, plan.poller_interval - seconds))
    return samples


def _start_clients(target: Target, accounts: list[Any], plan: Plan, action: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.slow_clients"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert child.stdin is not None
    spec = {
        "host": target.host, "port": target.port, "action": action, "size": plan.slow_size,
        "rate": plan.slow_rate, "receive_buffer": plan.slow_receive_buffer, "parallel": _PARALLEL_LOGINS,
        "accounts": [[a.user, a.password] for a in accounts],
    }
    child.stdin.write(json.dumps(spec) + "\n")
    child.stdin.close()
    return child


def _loaded(child: subprocess.Popen[str], target: Target, poller: Account, plan: Plan) -> tuple[list[float], dict[str, Any]]:
    """Poll while the child reports the slow clients all reading; returns the polls and the
    child's final report."""
    assert child.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    polls: list[float] = []
    ready = polling = False
    try:
        while True:
            wait = None
            if polling:
                seconds, _count = poll(target.host, target.port, poller.user, poller.password)
                polls.append(seconds)
                wait = max(0.0, plan.poller_interval - seconds)
            if selector.select(wait):
                line = child.stdout.readline()
                if not line:
                    raise RuntimeError(f"the slow clients' process exited with {child.wait()}")
                event = json.loads(line)
                if event["event"] == "ready":
                    progress(f"slow: every client of {target.name} is reading ({event['failed']} failed first)")
                    ready = polling = True
                elif event["event"] == "first_done" and ready:
                    # Every client reading: from "ready" to the first one done. (Should the
                    # first finish before the last started, the window runs to the end.)
                    polling = False
                elif event["event"] == "done":
                    return polls, {**event, "window_ends": "all done" if polling else "first done"}
    finally:
        selector.close()
        child.wait()


def run(servers: BenchServers, plan: Plan, rec: Recorder) -> None:
    store = servers.store
    progress(f"slow: {plan.slow_clients:,} accounts with a {size_text(plan.slow_size)} message")
    template = message_file(store, "slow-message", big_message(plan.slow_size, tag="slow"))
    accounts = write_accounts(store, plan.slow_clients, lambda _i: [template], progress)
    poller = make_accounts(store, 1, list(numbered_messages(10)))[0]
    # Dovecot indexes a maildir in its first session: do that for every account now, so
    # neither server's run pays for it.
    native = next(t for t in servers.targets if t.name == "native")
    _, report = _loaded(_start_clients(native, accounts, plan, "stat"), native, poller, plan)
    if report["complete"] != len(accounts):
        raise RuntimeError(f"logging in to the slow clients' accounts failed: {report['errors']}")
    bridge = servers.start_bridge("slow-bridge", f"[pool]\nmax_connections = {plan.slow_clients + 100}\n")
    for target in (native, Target("bridge", "127.0.0.1", bridge.port)):
        poll(target.host, target.port, poller.user, poller.password)
        unloaded = _unloaded_polls(target, poller, plan)
        progress(f"slow: {plan.slow_clients:,} slow clients on {target.name}")
        memory: dict[str, int] = {}
        if target.name == "bridge":
            memory["rss_before"] = rss_bytes(bridge.pid)
            cpu = cpu_seconds(bridge.pid)
            reset_peak(bridge.pid)
        busy, begun = machine_busy_seconds(), time.perf_counter()
        loaded, report = _loaded(_start_clients(target, accounts, plan, "retr"), target, poller, plan)
        # What the load itself cost the machine: on a real network the slow clients' CPU
        # would be on other machines, here it is taken from the servers'.
        rec.add("slow_clients_cpu", target.name, report["cpu_seconds"])
        rec.add("slow_machine_busy", target.name, (machine_busy_seconds() - busy) / (time.perf_counter() - begun))
        if target.name == "bridge":
            memory["peak"] = peak_rss_bytes(bridge.pid)
            memory["cpu_seconds"] = cpu_seconds(bridge.pid) - cpu
            rec.add("slow_rss_growth", "bridge", memory["peak"] - memory["rss_before"])
            rec.add("slow_cpu", "bridge", memory["cpu_seconds"])
        unloaded_p95 = percentile(unloaded, 95)
        loaded_p95 = percentile(loaded, 95) if loaded else None
        rec.add("slow", target.name, {
            "clients": len(accounts), "complete": report["complete"], "errors": report["errors"],
            "seconds": report["seconds"], "unloaded": unloaded, "loaded": loaded, **memory,
        })
        rec.add("slow_poller_unloaded", target.name, unloaded_p95)
        if loaded_p95 is not None:
            rec.add("slow_poller_loaded", target.name, loaded_p95)
            rec.add("slow_poller_ratio", target.name, loaded_p95 / unloaded_p95)
    rec.add("bridge_log", "slow", bridge.log_summary())
    bridge.stop()


def rows(rec: Recorder, plan: Plan) -> list[Row | Fact]:
    ms = 1000.0
    what = f"{plan.slow_clients:,} slow clients ({size_text(plan.slow_size)} at {plan.slow_rate // KIB} KiB/s)"
    out: list[Row | Fact] = [
        Row(f"{what}: bridge RSS growth, peak (MiB)", "slow_rss_growth", None, 1 / MIB, False, (), bound=256, unit=" MiB"),
        # The loaded p95 follows how full the bridge's one event loop is, which depends on the
        # host's speed as much as on the code: shown so that runs on different days compare.
        Row(f"{what}: bridge CPU over the row (s)", "slow_cpu", None, 1.0, False, ()),
        Row(f"{what}: the benchmark's slow clients' own CPU (s)", "slow_clients_cpu", None, 1.0, False, ()),
        Row(f"{what}: the machine's CPUs busy over the row (cores)", "slow_machine_busy", None, 1.0, False, (), digits=2),
        Row(f"{what}: fast poller p95, unloaded (ms)", "slow_poller_unloaded", None, ms, False, ()),
        Row(f"{what}: fast poller p95, loaded (ms)", "slow_poller_loaded", None, ms, False, ()),
        Row(f"{what}: fast poller p95, loaded ÷ unloaded", "slow_poller_ratio", None, 1.0, False, (), bound=1.5, unit="×"),
    ]
    done = {name: rec.values("slow", name) for name in ("native", "bridge")}
    if done["bridge"]:
        got = done["bridge"][0]
        polls = {name: len(v[0]["loaded"]) for name, v in done.items() if v}
        out.append(Fact(
            f"{what}: whole message received (fast polls while loaded)",
            f"{got['complete']:,}/{got['clients']:,} ({polls['bridge']})", "all", got["complete"] == got["clients"],
            {"complete": got["complete"], "clients": got["clients"], "errors": got["errors"], "loaded_polls": polls},
            native=f"{done['native'][0]['complete']:,}/{done['native'][0]['clients']:,} ({polls['native']})" if done["native"] else "",
        ))
    return out


if __name__ == "__main__":
    raise SystemExit(child_main())
