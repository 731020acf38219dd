"""The classic rows: polls of a 5,000-message mailbox, session set-up, a big RETR, a download
of many small messages, 100 concurrent clients; then the bridge's memory with idle sessions
and during RETR. Measured on the three servers of `BenchServers`, in interleaved rounds
whose order rotates, so the machine's drift hits all three alike."""

from __future__ import annotations

import sys
from typing import Any

from bench import scenarios
from bench.plans import MIB, Plan, size_text
from bench.report import TARGET_NAMES, Fact, Recorder, Row, progress
from bench.servers import BenchServers, Target
from sandbox import big_message, numbered_messages


def rotated(targets: list[Target], round_number: int) -> list[Target]:
    shift = round_number % len(targets)
    return targets[shift:] + targets[:shift]


def seed(servers: BenchServers, plan: Plan) -> dict[str, Any]:
    store = servers.store
    make = scenarios.make_accounts
    progress("classic rows: seeding mailboxes over IMAP")
    poll_corpus = list(numbered_messages(plan.poll_messages))
    # A fresh mailbox per round and server: "first poll" means that server has never seen it.
    first = [
        dict(zip(TARGET_NAMES, make(store, len(TARGET_NAMES), poll_corpus), strict=True))
        for _ in range(plan.rounds)
    ]
    return {
        "poll": first,
        "setup": make(store, 1, list(numbered_messages(10)))[0],
        "big": make(store, 1, [big_message(plan.big_size), big_message(plan.small_size, tag="small")])[0],
        # A big message per round that no server has sent before (the bridge's message cache
        # has not seen it: the RETR streams from the IMAP server), and one for the memory row.
        "big_cold": make(
            store, 1, [big_message(plan.big_size, tag=f"cold{n}") for n in range(plan.rounds + 1)]
        )[0],
        "download": make(store, 1, list(numbered_messages(plan.download_messages)))[0],
        "concurrent": concurrent_accounts(servers, plan),
        "idle": make(store, plan.idle_sessions, list(numbered_messages(3))),
    }


def concurrent_accounts(servers: BenchServers, plan: Plan) -> list[scenarios.Account]:
    """The concurrency row's accounts (made once, shared with the workers row)."""
    if servers.shared.get("concurrent") is None:
        servers.shared["concurrent"] = scenarios.make_accounts(
            servers.store, plan.concurrent_clients, list(numbered_messages(plan.concurrent_messages))
        )
    return servers.shared["concurrent"]


def warm_up(targets: list[Target], accounts: dict[str, Any], plan: Plan) -> None:
    # Each server sees each shared account once before timing, so no server pays a
    # first-contact cost (imapc's index, Dovecot's caches) inside a timed sample.
    for target in targets:
        scenarios.measure_setup(target, accounts["setup"])
        scenarios.measure_retr(target, accounts["big"], 2, plan.small_size)
        scenarios.measure_download(target, accounts["download"], plan.download_messages)
        for account in accounts["concurrent"]:
            scenarios.measure_setup(target, account)


def run_rounds(targets: list[Target], accounts: dict[str, Any], plan: Plan, rec: Recorder) -> None:
    for round_number in range(plan.rounds):
        order = rotated(targets, round_number)
        progress(f"classic round {round_number + 1}/{plan.rounds}: {', '.join(t.name for t in order)}")
        polls = accounts["poll"][round_number]
        for target in order:
            rec.add("poll_first", target.name, scenarios.measure_poll(target, polls[target.name], plan.poll_messages))
        for _ in range(plan.warm_polls):
            for target in order:
                rec.add("poll_warm", target.name, scenarios.measure_poll(target, polls[target.name], plan.poll_messages))
        for _ in range(plan.setup_sessions):
            for target in order:
                rec.add("setup", target.name, scenarios.measure_setup(target, accounts["setup"]))
        for target in order:
            rec.add("retr_big", target.name, scenarios.measure_retr(target, accounts["big"], 1, plan.big_size))
        for target in order:
            rec.add(
                "retr_big_cold", target.name,
                scenarios.measure_retr(target, accounts["big_cold"], round_number + 1, plan.big_size),
            )
        for target in order:
            rec.add("download", target.name, scenarios.measure_download(target, accounts["download"], plan.download_messages))
        for target in order:
            rec.add(
                "concurrent", target.name,
                scenarios.measure_concurrent(target, accounts["concurrent"], plan.concurrent_sessions),
            )


def run_memory(servers: BenchServers, accounts: dict[str, Any], plan: Plan, rec: Recorder) -> None:
    bridge = next(t for t in servers.targets if t.name == "bridge")
    pid = servers.bridge.pid
    progress(f"bridge memory: {plan.idle_sessions} idle sessions")
    rec.add("idle_rss", "bridge", scenarios.measure_idle_sessions(bridge, pid, accounts["idle"]))
    progress("bridge memory: RETR growth")
    # The 32 MiB message was never sent before: it streams from the IMAP server. (The 1 MiB
    # one was, in the warm-up; what the message cache keeps is in the page cache, not RSS.)
    rec.add(f"retr_rss_{plan.small_size}", "bridge", scenarios.measure_retr_memory(bridge, pid, accounts["big"], 2, plan.small_size))
    rec.add(
        f"retr_rss_{plan.big_size}", "bridge",
        scenarios.measure_retr_memory(bridge, pid, accounts["big_cold"], plan.rounds + 1, plan.big_size),
    )


def run(servers: BenchServers, plan: Plan, rec: Recorder, *, memory: bool = True) -> None:
    targets = servers.targets
    accounts = seed(servers, plan)
    progress("classic rows: warm-up")
    warm_up(targets, accounts, plan)
    run_rounds(targets, accounts, plan, rec)
    if memory:
        try:
            run_memory(servers, accounts, plan, rec)
        except Exception as exc:  # keep the timings measured so far
            progress(f"memory measurement failed: {exc}; bridge log tail:")
            print(servers.bridge.log_path.read_text()[-3000:], file=sys.stderr)
            rec.add("memory_error", "bridge", str(exc))
    rec.add("bridge_log", "classic", servers.bridge.log_summary())


def rows(rec: Recorder, plan: Plan) -> list[Row | Fact]:
    ms = 1000.0
    out: list[Row | Fact] = [
        Row(f"poll {plan.poll_messages:,} msgs, first (ms)", "poll_first", None, ms, False, (("native", 1.2), ("imapc", 0.5))),
        Row(f"poll {plan.poll_messages:,} msgs, warm (ms)", "poll_warm", None, ms, False, (("native", 1.2), ("imapc", 0.5))),
        Row("session set-up to STAT (ms)", "setup", None, ms, False, (("native", 1.3),)),
        Row(f"RETR {size_text(plan.big_size)} (ms)", "retr_big", None, ms, False, (("native", 0.5),)),
        Row(
            f"RETR {size_text(plan.big_size)}, first time (ms)", "retr_big_cold", None, ms, False, (("native", 1.0),),
        ),
        Row(f"download {plan.download_messages:,} msgs (ms)", "download", "seconds", ms, False, (("native", 0.8),)),
        # Where a download's time goes: the RETRs that answer at once, and the few that waited.
        Row("download: median RETR round trip (µs)", "download", "retr_median", 1e6, False, ()),
        Row(
            f"download: RETRs over {scenarios.STALLED_RETR_SECONDS * 1000:g} ms, how many", "download", "stalls", 1.0, False, (),
            digits=0,
        ),
        Row(f"download: RETRs over {scenarios.STALLED_RETR_SECONDS * 1000:g} ms, their time (ms)", "download", "stall_seconds", ms, False, ()),
        Row(f"{plan.concurrent_clients} clients: sessions/s", "concurrent", "sessions_per_second", 1.0, True, (("native", 0.8),)),
        Row(f"{plan.concurrent_clients} clients: p95 (ms)", "concurrent", "p95_seconds", ms, False, (("native", 1.5),)),
    ]
    idle = rec.values("idle_rss", "bridge")
    if idle:
        sample = idle[0]
        mib = sample["rss_with_sessions"] / MIB
        out.append(Fact(
            f"bridge RSS with {sample['sessions']:,} idle sessions (MiB)", f"{mib:,.1f}",
            f"≤ 200 MiB (at start: {sample['rss_before'] / MIB:,.1f})", mib <= 200,
            {"limit_mib": 200, "mib": mib},
        ))
    small = rec.values(f"retr_rss_{plan.small_size}", "bridge")
    large = rec.values(f"retr_rss_{plan.big_size}", "bridge")
    if small and large:
        g_small, g_large = small[0]["growth"] / MIB, large[0]["growth"] / MIB
        # Flat: the bigger message costs at most a few fetch chunks more than the small one.
        out.append(Fact(
            f"bridge RSS growth during RETR {plan.small_size // 1024:,} KiB / {plan.big_size // 1024:,} KiB (MiB)",
            f"{g_small:,.1f} / {g_large:,.1f}", "flat in size", g_large <= g_small + 4,
            {"small_mib": g_small, "large_mib": g_large},
        ))
    return out
