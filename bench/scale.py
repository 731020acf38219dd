"""10,000 devices on one bridge process: as many concurrent POP3 sessions as the plan says,
each logged in to its own account and idle after STAT; then every one of them does RETR 1,
DELE 1, QUIT.

Measured on the bridge (one worker, `pool.max_connections` = plan.scale_pool): its RSS while
the sessions are idle, the IMAP connections it holds then (its sockets connected to the
store's IMAP port), the most connections the store's IMAP port had at any sample while the
sessions logged in, idled and finished (sampled every 0.25 s from the kernel's TCP table),
and whether every session got its own message and its deletion reached the store (read from
the maildirs afterwards: the message file RETR 1 returned is gone, the others are there).
For comparison, the same sessions are held on Dovecot's own POP3 (memory only: the PSS and
RSS sums of all its processes).

The row has its own store Dovecot, configured for that many connections: mail processes
serving many connections each (`client_limit`), login processes in high-performance mode.
Its accounts are written straight into their maildirs (bench/maildirs.py): 10,000 accounts
over IMAP would take minutes; Dovecot indexes each mailbox in its first session.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from bench.asyncclient import AsyncPop3, unstuff
from bench.maildirs import SeededAccount, remaining_files, write_accounts
from bench.plans import MIB, Plan
from bench.pop3client import Pop3Error
from bench.proc import (
    cpu_seconds,
    process_connections_to,
    rss_bytes,
    server_connections,
    tree_memory,
)
from bench.report import Fact, Recorder, Row, progress
from bench.servers import BenchServers, Target
from sandbox import DovecotSandbox

# Connections each Dovecot imap/pop3 process serves. Dovecot's default is 1 (a process per
# connection): 10,000 connections would be 10,000 processes.
_PER_PROCESS = 50
_SAMPLE_SECONDS = 0.25
_SESSION_TIMEOUT = 120.0
_ERRORS = (OSError, Pop3Error, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


def store_config(sessions: int) -> str:
    """What Dovecot needs to hold `sessions` IMAP (or POP3) connections at once."""
    processes = sessions // _PER_PROCESS + 100
    # Also the limit of auth, anvil and the login processes; Dovecot warns when it exceeds the
    # descriptor limit, which must cover the bridge's connections too (sessions + pool).
    clients = sessions + 1000
    mail_service = f"  client_limit = {_PER_PROCESS}\n  service_count = 0\n  process_limit = {processes}\n"
    login_service = "  service_count = 0\n  process_min_avail = 2\n"
    return (
        f"default_process_limit = {processes}\ndefault_client_limit = {clients}\n"
        f"service imap {{\n{mail_service}}}\nservice pop3 {{\n{mail_service}}}\n"
        f"service imap-login {{\n{login_service}}}\nservice pop3-login {{\n{login_service}}}\n"
    )


def message(account: int, number: int) -> bytes:
    return (
        b"From: Sender <sender@example.org>\r\nTo: device-%d@example.org\r\n"
        b"Subject: account %d, message %d\r\nMessage-ID: <scale-%d-%d@bench.example.org>\r\n\r\n"
        b"Mail for account %d, message %d.\r\n.\r\nA line that was only a dot, above.\r\n"
        % (account, account, number, account, number, account, number)
    )


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:100]}"


class Storm:
    """The sessions of one server, driven from one Trio loop."""

    def __init__(self, target: Target, accounts: list[SeededAccount], plan: Plan, watch: tuple[str, int] | None) -> None:
        self.target = target
        self.accounts = accounts
        self.plan = plan
        self.watch = watch  # the store's IMAP host and port, whose connections are sampled
        self.clients: dict[int, AsyncPop3] = {}
        self.errors: Counter[str] = Counter()
        self.retrieved: dict[int, str] = {}  # account index -> the file RETR 1 returned
        self.phase = "log-in"
        self.most_by_phase: dict[str, int] = {}
        self.samples = 0

    async def _sample(self) -> None:
        assert self.watch is not None
        while True:
            count = await trio.to_thread.run_sync(server_connections, *self.watch)
            self.most_by_phase[self.phase] = max(self.most_by_phase.get(self.phase, 0), count)
            self.samples += 1
            await trio.sleep(_SAMPLE_SECONDS)

    async def _open(self, index: int, limiter: trio.CapacityLimiter) -> None:
        account = self.accounts[index]
        async with limiter:
            try:
                with trio.fail_after(_SESSION_TIMEOUT):
                    client = await AsyncPop3.connect(self.target.host, self.target.port)
            except _ERRORS as exc:
                self.errors["connect: " + _short(exc)] += 1
                return
            try:
                with trio.fail_after(_SESSION_TIMEOUT):
                    await client.login(account.user, account.password)
                    count, _size = await client.stat()
                if count != len(account.files):
                    raise Pop3Error(f"STAT says {count} messages, expected {len(account.files)}")
            except _ERRORS as exc:
                self.errors["login/STAT: " + _short(exc)] += 1
                await client.aclose()
                return
            self.clients[index] = client
        if len(self.clients) % 1000 == 0:
            progress(f"{self.target.name}: {len(self.clients):,} sessions open")

    async def _finish(self, index: int, limiter: trio.CapacityLimiter, delete: bool) -> None:
        client = self.clients[index]
        async with limiter:
            try:
                with trio.fail_after(_SESSION_TIMEOUT):
                    if delete:
                        _size, body = await client.multiline(b"RETR 1", keep=True)
                        got = unstuff(body)
                        mine = [message(index, n) for n in range(len(self.accounts[index].files))]
                        if got not in mine:
                            raise Pop3Error("RETR 1 returned a message that is not this account's")
                        await client.command(b"DELE 1")
                        await client.quit()
                        self.retrieved[index] = self.accounts[index].files[mine.index(got)]
                    else:
                        await client.quit()
            except _ERRORS as exc:
                self.errors[("RETR/DELE/QUIT: " if delete else "QUIT: ") + _short(exc)] += 1
            finally:
                await client.aclose()

    async def run(self, at_idle: Callable[[], dict[str, Any]], delete: bool) -> dict[str, Any]:
        limiter = trio.CapacityLimiter(self.plan.scale_parallel)
        async with trio.open_nursery() as watchers:
            if self.watch is not None:
                watchers.start_soon(self._sample)
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in range(len(self.accounts)):
                    nursery.start_soon(self._open, index, limiter)
            opened_in = time.perf_counter() - started
            progress(f"{self.target.name}: {len(self.clients):,} sessions idle after STAT; measuring")
            self.phase = "idle"
            # Let the server finish what logging in left behind (a settle, not readiness).
            await trio.sleep(1.0)
            idle = await trio.to_thread.run_sync(at_idle)
            self.phase = "finish"
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for index in list(self.clients):
                    nursery.start_soon(self._finish, index, limiter, delete)
            finished_in = time.perf_counter() - started
            watchers.cancel_scope.cancel()
        return {
            "sessions": len(self.accounts),
            "opened": len(self.clients),
            "completed": len(self.retrieved) if delete else None,
            "errors": dict(self.errors.most_common(10)),
            "error_count": sum(self.errors.values()),
            "open_seconds": opened_in,
            "finish_seconds": finished_in,
            "most_upstream_connections": max(self.most_by_phase.values()) if self.watch else None,
            "most_upstream_connections_by_phase": self.most_by_phase,
            "connection_samples": self.samples,
            **idle,
        }


def _check_deletions(store: DovecotSandbox, accounts: list[SeededAccount], retrieved: dict[int, str]) -> dict[str, int]:
    """What the store holds now: completed sessions lost exactly the message they deleted;
    every other account still has all of its mail."""
    as_asked = wrong = 0
    for index, account in enumerate(accounts):
        left = remaining_files(store, account.user)
        expected = set(account.files) - ({retrieved[index]} if index in retrieved else set())
        if left == expected:
            as_asked += index in retrieved
        else:
            wrong += 1
    return {"deleted_upstream": as_asked, "mailboxes_wrong": wrong}


def run(servers: BenchServers, plan: Plan, rec: Recorder) -> None:
    sessions = plan.scale_sessions
    store = servers.start_store("scale-store", store_config(sessions))
    progress(f"scale: writing {sessions:,} accounts into their maildirs")
    started = time.perf_counter()
    accounts = write_accounts(
        store, sessions, lambda i: [message(i, n) for n in range(plan.scale_messages)], progress
    )
    rec.add("scale_seed_seconds", "store", time.perf_counter() - started)

    if plan.scale_native:
        master = store.pid
        assert master is not None
        before = tree_memory(master)

        def native_idle() -> dict[str, Any]:
            during = tree_memory(master)
            return {"memory_before": before, "memory": during}

        progress(f"scale: {sessions:,} sessions on Dovecot's own POP3")
        native = Target("native", store.host, store.pop3_port)
        result = trio.run(Storm(native, accounts, plan, None).run, native_idle, False)
        rec.add("scale", "native", result)
        rec.add("scale_rss", "native", result["memory"]["pss"])

    bridge = servers.start_bridge(
        "scale-bridge", f"[pool]\nmax_connections = {plan.scale_pool}\n[server]\nworkers = 1\n",
        max_connections=sessions + 100, store=store,
    )
    rss_before = rss_bytes(bridge.pid)
    cpu_before = cpu_seconds(bridge.pid)

    def bridge_idle() -> dict[str, Any]:
        return {
            "rss_before": rss_before,
            "rss": rss_bytes(bridge.pid),
            "upstream_held": process_connections_to(bridge.pid, store.host, store.imap_port),
            "cpu_seconds_to_idle": cpu_seconds(bridge.pid) - cpu_before,
        }

    progress(f"scale: {sessions:,} sessions on the bridge (pool.max_connections = {plan.scale_pool})")
    storm = Storm(Target("bridge", "127.0.0.1", bridge.port), accounts, plan, (store.host, store.imap_port))
    result = trio.run(storm.run, bridge_idle, True)
    result["cpu_seconds"] = cpu_seconds(bridge.pid) - cpu_before
    result.update(_check_deletions(store, accounts, storm.retrieved))
    result["pool_max_connections"] = plan.scale_pool
    result["bridge_log"] = bridge.log_summary()
    rec.add("scale", "bridge", result)
    rec.add("scale_rss", "bridge", result["rss"])
    rec.add("scale_upstream_held", "bridge", result["upstream_held"])
    rec.add("scale_upstream_max", "bridge", result["most_upstream_connections"])
    progress(
        f"scale: {result['opened']:,} opened, {result['completed']:,} completed, "
        f"{result['deleted_upstream']:,} deletions in the store, {result['error_count']:,} errors"
    )
    bridge.stop()
    store.stop()


def rows(rec: Recorder, plan: Plan) -> list[Row | Fact]:
    n = f"{plan.scale_sessions:,}"
    out: list[Row | Fact] = [
        Row(
            f"{n} idle sessions: server memory (MiB)", "scale_rss", None, 1 / MIB, False, (),
            bound=1024, unit=" MiB",
            note="bridge: RSS; native: PSS sum of Dovecot's processes (RSS where PSS was not readable: pss_from_rss in the JSON)",
        ),
        Row(
            f"{n} idle sessions: IMAP connections the bridge holds", "scale_upstream_held", None, 1.0,
            False, (), bound=plan.scale_pool, unit=" (pool.max_connections)", digits=0,
        ),
        Row(
            f"{n} sessions: most IMAP connections the store had (sampled)", "scale_upstream_max", None,
            1.0, False, (), bound=plan.scale_pool, unit=" (pool.max_connections)", digits=0,
        ),
    ]
    bridge = rec.values("scale", "bridge")
    native = rec.values("scale", "native")
    if bridge:
        got = bridge[0]
        out.append(Fact(
            f"{n} sessions: seconds to log in all / to finish all ({plan.scale_parallel} at a time)",
            f"{got['open_seconds']:,.1f} / {got['finish_seconds']:,.1f}", "(reported)", None,
            {key: got[key] for key in ("open_seconds", "finish_seconds")},
            native=f"{native[0]['open_seconds']:,.1f} / (QUIT only)" if native else "",
        ))
        ok = (
            got["opened"] == got["sessions"] == got["completed"] == got["deleted_upstream"]
            and got["mailboxes_wrong"] == 0
        )
        out.append(Fact(
            f"{n} sessions: opened / RETR+DELE+QUIT done / deleted in the store",
            f"{got['opened']:,} / {got['completed']:,} / {got['deleted_upstream']:,}",
            f"all {n}, no other mail touched", ok,
            {key: got[key] for key in ("sessions", "opened", "completed", "deleted_upstream", "mailboxes_wrong", "errors")},
            native=f"{native[0]['opened']:,} opened" if native else "",
        ))
    return out
