"""A mailbox that grew for a decade: plan.huge_messages small messages, polled ("leave mail on
server": login, STAT, UIDL, LIST, QUIT) by each of the three servers.

- first poll: of a mailbox that server never saw (one per server and round);
- warm poll: the same mailbox again, unchanged (plan.huge_warm_polls times per round);
- the bridge's memory: the peak of its RSS (VmHWM, reset right before the poll through
  /proc/<pid>/clear_refs) over its RSS before, during the first poll and during a warm poll,
  and what stays resident after the first poll (the snapshot kept with the parked
  connection, plus whatever the allocator did not hand back). The target is on the peak of
  the first poll: that is what each concurrent first poll of such a mailbox costs.

Seeding: one mailbox gets the messages over IMAP (pipelined MULTIAPPEND, the state Dovecot
is in after real deliveries), and every mailbox the rows poll is a copy of it made before
any server opened it (bench/maildirs.py `clone_account`: index files copied, message files
hard-linked), so each server's first poll is of a mailbox only the APPENDs touched.
The row has its own bridge process, so its memory is this row's alone.
"""

from __future__ import annotations

import time

from bench.classic import rotated
from bench.maildirs import clone_account
from bench.plans import MIB, Plan
from bench.proc import peak_rss_bytes, reset_peak, rss_bytes
from bench.report import TARGET_NAMES, Fact, Recorder, Row, progress
from bench.scenarios import Account, measure_poll
from bench.servers import BenchServers, BridgeProcess, Target
from sandbox import numbered_messages


def _measured_poll(target: Target, account: Account, plan: Plan, bridge: BridgeProcess) -> tuple[float, dict[str, int] | None]:
    """One poll; for the bridge also its RSS before, its peak during, and its RSS after."""
    if target.name != "bridge":
        return measure_poll(target, account, plan.huge_messages), None
    before = rss_bytes(bridge.pid)
    reset_peak(bridge.pid)
    seconds = measure_poll(target, account, plan.huge_messages)
    memory = {"rss_before": before, "peak": peak_rss_bytes(bridge.pid), "rss_after": rss_bytes(bridge.pid)}
    return seconds, memory


def run(servers: BenchServers, plan: Plan, rec: Recorder) -> None:
    store = servers.store
    count = plan.huge_messages
    progress(f"huge: seeding a {count:,}-message mailbox over IMAP")
    started = time.perf_counter()
    template = store.new_mailbox()
    template.append(numbered_messages(count))
    seeded = time.perf_counter()
    mailboxes = []
    for _ in range(plan.huge_rounds):
        mailboxes.append({name: Account(*clone_account(store, template.user)) for name in TARGET_NAMES})
    rec.add("huge_seed_seconds", "store", {"append": seeded - started, "copies": time.perf_counter() - seeded})
    progress(f"huge: seeded in {seeded - started:,.0f} s, {3 * plan.huge_rounds} copies in {time.perf_counter() - seeded:,.0f} s")

    bridge = servers.start_bridge("huge-bridge")
    targets = servers.target_set(bridge)
    for round_number in range(plan.huge_rounds):
        order = rotated(targets, round_number)
        progress(f"huge round {round_number + 1}/{plan.huge_rounds}: {', '.join(t.name for t in order)}")
        for target in order:
            seconds, memory = _measured_poll(target, mailboxes[round_number][target.name], plan, bridge)
            rec.add("poll_huge_first", target.name, seconds)
            if memory:
                rec.add("huge_memory_first", "bridge", memory)
        for _ in range(plan.huge_warm_polls):
            for target in order:
                seconds, memory = _measured_poll(target, mailboxes[round_number][target.name], plan, bridge)
                rec.add("poll_huge_warm", target.name, seconds)
                if memory:
                    rec.add("huge_memory_warm", "bridge", memory)
    rec.add("bridge_log", "huge", bridge.log_summary())
    bridge.stop()


def rows(rec: Recorder, plan: Plan) -> list[Row | Fact]:
    ms = 1000.0
    n = f"{plan.huge_messages:,}"
    out: list[Row | Fact] = [
        Row(f"poll {n} msgs, first (ms)", "poll_huge_first", None, ms, False, (("native", 1.2),)),
        Row(f"poll {n} msgs, warm (ms)", "poll_huge_warm", None, ms, False, (("native", 0.5),)),
    ]
    first = rec.values("huge_memory_first", "bridge")
    warm = rec.values("huge_memory_warm", "bridge")
    if first and warm:
        peak = max(m["peak"] - m["rss_before"] for m in first) / MIB
        kept = max(m["rss_after"] - m["rss_before"] for m in first) / MIB
        warm_peak = max(m["peak"] - m["rss_before"] for m in warm) / MIB
        out.append(Fact(
            f"bridge RSS growth, poll of {n} msgs: first peak / kept after it / warm peak (MiB)",
            f"{peak:,.1f} / {kept:,.1f} / {warm_peak:,.1f}", "first peak ≤ 40 MiB", peak <= 40,
            {"limit_mib": 40, "first_peak_mib": peak, "kept_mib": kept, "warm_peak_mib": warm_peak},
        ))
    return out
