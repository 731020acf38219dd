"""How big each row of the benchmark is, per run size: `full` (the figures in
docs/performance.md), `quick` (a few minutes) and `tiny` (the test suite's end-to-end run;
measures nothing worth reading)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
KIB = 1024


@dataclass(frozen=True)
class Plan:
    # The classic rows (bench/classic.py).
    rounds: int
    poll_messages: int
    warm_polls: int
    setup_sessions: int
    big_size: int
    small_size: int
    download_messages: int
    concurrent_clients: int
    concurrent_sessions: int
    concurrent_messages: int
    idle_sessions: int
    # Many idle sessions on one bridge process (bench/scale.py).
    scale_sessions: int
    scale_pool: int  # the bridge's pool.max_connections for that row
    scale_parallel: int  # sessions logging in (and later finishing) at once
    scale_messages: int  # per account
    scale_native: bool  # hold the same sessions on Dovecot's own POP3 too, for its memory
    # A huge mailbox (bench/huge_mailbox.py).
    huge_messages: int
    huge_rounds: int
    huge_warm_polls: int
    # Slow readers (bench/slow_clients.py).
    slow_clients: int
    slow_size: int
    slow_rate: int  # bytes/s each slow client reads
    slow_receive_buffer: int
    poller_interval: float  # seconds between the fast poller's polls
    poller_baseline: int  # its polls with nothing else running
    # server.workers = 2 against 1 (bench/workers.py): rounds, and sessions each of the
    # concurrency row's clients runs in one (more than the classic row's, so that a round
    # lasts seconds, not the second in which the start and the end of the run weigh most).
    workers_rounds: int
    workers_sessions: int


PLANS = {
    "full": Plan(
        rounds=5, poll_messages=5000, warm_polls=3, setup_sessions=20, big_size=32 * MIB,
        small_size=1 * MIB, download_messages=1000, concurrent_clients=100,
        concurrent_sessions=3, concurrent_messages=10, idle_sessions=1000,
        scale_sessions=10_000, scale_pool=200, scale_parallel=200, scale_messages=2, scale_native=True,
        huge_messages=200_000, huge_rounds=2, huge_warm_polls=3,
        slow_clients=1000, slow_size=4 * MIB, slow_rate=64 * KIB, slow_receive_buffer=16 * KIB,
        poller_interval=0.2, poller_baseline=50,
        workers_rounds=3, workers_sessions=10,
    ),
    "quick": Plan(
        rounds=2, poll_messages=1000, warm_polls=2, setup_sessions=5, big_size=4 * MIB,
        small_size=256 * 1024, download_messages=200, concurrent_clients=20,
        concurrent_sessions=2, concurrent_messages=5, idle_sessions=100,
        scale_sessions=1000, scale_pool=50, scale_parallel=100, scale_messages=2, scale_native=True,
        huge_messages=20_000, huge_rounds=1, huge_warm_polls=2,
        slow_clients=100, slow_size=512 * KIB, slow_rate=64 * KIB, slow_receive_buffer=16 * KIB,
        poller_interval=0.2, poller_baseline=20,
        workers_rounds=2, workers_sessions=3,
    ),
    # For the smoke test: proves the whole pipeline works, measures nothing worth reading.
    "tiny": Plan(
        rounds=1, poll_messages=20, warm_polls=1, setup_sessions=1, big_size=200 * 1024,
        small_size=50 * 1024, download_messages=5, concurrent_clients=2,
        concurrent_sessions=1, concurrent_messages=2, idle_sessions=3,
        scale_sessions=20, scale_pool=5, scale_parallel=10, scale_messages=2, scale_native=True,
        huge_messages=300, huge_rounds=1, huge_warm_polls=1,
        slow_clients=4, slow_size=64 * KIB, slow_rate=64 * KIB, slow_receive_buffer=16 * KIB,
        poller_interval=0.2, poller_baseline=3,
        workers_rounds=1, workers_sessions=1,
    ),
}


def size_text(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB and size % MIB == 0 else f"{size // KIB:,} KiB"
