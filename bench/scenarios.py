"""What the benchmark measures, one function per measurement; each returns raw samples.

Every function takes a `Target` (host/port of one POP3 server) so the same client code runs
against the native Dovecot, the imapc Dovecot and the bridge alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bench.pop3client import Pop3Client, Pop3Error, poll, session_setup
from bench.proc import peak_rss_bytes, reset_peak, rss_bytes
from bench.servers import Target
from sandbox import DovecotSandbox, Mailbox


@dataclass(frozen=True)
class Account:
    user: str
    password: str


def make_accounts(store: DovecotSandbox, count: int, messages: list[bytes], workers: int = 8) -> list[Account]:
    """`count` fresh users on the store, each holding `messages` (seeded over IMAP)."""
    boxes: list[Mailbox] = [store.new_mailbox() for _ in range(count)]
    if messages:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda box: box.append(messages), boxes))
    return [Account(box.user, box.password) for box in boxes]


def measure_poll(target: Target, account: Account, expected: int) -> float:
    seconds, count = poll(target.host, target.port, account.user, account.password)
    if count != expected:
        raise Pop3Error(f"{target.name}: STAT says {count} messages, expected {expected}")
    return seconds


def measure_setup(target: Target, account: Account) -> float:
    return session_setup(target.host, target.port, account.user, account.password)


def measure_retr(target: Target, account: Account, number: int, size: int) -> float:
    with Pop3Client(target.host, target.port) as client:
        client.login(account.user, account.password)
        started = time.perf_counter()
        got = client.multiline(b"RETR %d" % number)
        elapsed = time.perf_counter() - started
        client.quit()
    # Dot-stuffing adds bytes on the wire; fewer than the message size means truncation.
    if got < size:
        raise Pop3Error(f"{target.name}: RETR {number} sent {got} bytes, expected at least {size}")
    return elapsed


# A RETR of a small message takes tens of microseconds on loopback; one that takes this long
# waited for something else (a batch from the IMAP server, a CPU).
STALLED_RETR_SECONDS = 0.0005


def measure_download(target: Target, account: Account, count: int) -> dict[str, float]:
    """One session that downloads every message, one RETR after the other. Besides the
    session's time ("seconds"), how it splits: the median RETR's round trip from sending the
    command to the end of the reply ("retr_median"), and the RETRs that took longer than
    `STALLED_RETR_SECONDS` (how many, "stalls", and their time together, "stall_seconds")."""
    clock = time.perf_counter
    round_trips: list[float] = []
    started = clock()
    with Pop3Client(target.host, target.port) as client:
        client.login(account.user, account.password)
        found, _size = client.stat()
        if found != count:
            raise Pop3Error(f"{target.name}: STAT says {found}, expected {count}")
        for number in range(1, count + 1):
            sent = clock()
            client.multiline(b"RETR %d" % number)
            round_trips.append(clock() - sent)
        client.quit()
    seconds = clock() - started
    stalled = [took for took in round_trips if took > STALLED_RETR_SECONDS]
    return {
        "seconds": seconds,
        "retr_median": statistics.median(round_trips) if round_trips else 0.0,
        "stalls": float(len(stalled)),
        "stall_seconds": sum(stalled),
    }


def _poll_and_retrieve(target: Target, account: Account) -> float:
    started = time.perf_counter()
    with Pop3Client(target.host, target.port) as client:
        client.login(account.user, account.password)
        count, _size = client.stat()
        client.multiline(b"UIDL")
        client.multiline(b"LIST")
        for number in range(1, count + 1):
            client.multiline(b"RETR %d" % number)
        client.quit()
    return time.perf_counter() - started


def measure_concurrent(
    target: Target, accounts: list[Account], sessions_each: int, *, count_failures: bool = False,
) -> dict[str, float]:
    """One client thread per account, all started together, each running `sessions_each`
    poll-and-retrieve sessions back to back. Returns sessions/s and latency percentiles.
    A failed session raises, unless `count_failures`: then it is counted ("failed") and
    left out of the figures, and the client goes on with its next session."""
    barrier = threading.Barrier(len(accounts) + 1)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(account: Account) -> None:
        barrier.wait()
        for _ in range(sessions_each):
            try:
                latency = _poll_and_retrieve(target, account)
            except (OSError, Pop3Error) as exc:
                if not count_failures:
                    raise
                with lock:
                    failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(latency)

    with ThreadPoolExecutor(max_workers=len(accounts)) as pool:
        futures = [pool.submit(client, account) for account in accounts]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - started
    if not latencies and not count_failures:
        raise Pop3Error(f"{target.name}: no session of the concurrency row completed")
    result = {
        "sessions_per_second": len(latencies) / wall,
        # None when every session failed (count_failures): no latency to speak of.
        "p95_seconds": percentile(latencies, 95) if latencies else None,
        "median_seconds": statistics.median(latencies) if latencies else None,
    }
    if count_failures:
        result["failed"] = len(failures)
        result["failures"] = sorted(set(failures))[:5]  # type: ignore[assignment]
    return result


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(pct) - 1]


# -- memory (the bridge process only) ---------------------------------------------------------


def measure_idle_sessions(target: Target, pid: int, accounts: list[Account]) -> dict[str, float]:
    """RSS of the process `pid` before and while `accounts` each hold one logged-in, idle
    POP3 session."""
    before = rss_bytes(pid)
    clients: list[Pop3Client] = []
    lock = threading.Lock()

    def open_session(account: Account) -> None:
        client = Pop3Client(target.host, target.port)
        with lock:
            clients.append(client)
        client.login(account.user, account.password)
        client.stat()

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(open_session, accounts))
        time.sleep(1.0)  # let the process settle (not readiness: everything is logged in)
        during = rss_bytes(pid)
    finally:
        for client in clients:
            try:
                client.quit()
            except (OSError, Pop3Error):
                pass
            client.close()
    return {"sessions": len(accounts), "rss_before": before, "rss_with_sessions": during}


def measure_retr_memory(target: Target, pid: int, account: Account, number: int, size: int) -> dict[str, float]:
    """Peak RSS growth of `pid` while it serves RETR `number`. Linux: the peak (VmHWM) is
    reset through /proc/pid/clear_refs right before the command, so no sampling is missed."""
    with Pop3Client(target.host, target.port) as client:
        client.login(account.user, account.password)
        client.stat()
        before = rss_bytes(pid)
        reset_peak(pid)
        got = client.multiline(b"RETR %d" % number)
        peak = peak_rss_bytes(pid)
        client.quit()
    if got < size:
        raise Pop3Error(f"RETR {number} sent {got} bytes, expected at least {size}")
    return {"size": size, "rss_before": before, "rss_peak": peak, "growth": max(0, peak - before)}
