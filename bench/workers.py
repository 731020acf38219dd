"""`server.workers = 2` against 1: the 100-client concurrency row (bench/scenarios.py
`measure_concurrent`) on two fresh bridges that differ only in that setting, with Dovecot's
own POP3 for reference, in interleaved rounds whose order rotates. On a 2-core machine the
benchmark's client threads share the cores with the workers, so the factor is what this
machine gives, not what two dedicated cores would."""

from __future__ import annotations

from bench import scenarios
from bench.classic import concurrent_accounts, rotated
from bench.plans import Plan
from bench.report import Fact, Recorder, Row, progress
from bench.servers import BenchServers, BridgeProcess, Target

# Warm-up sessions per account: with two workers, the chance that one of them has not
# served a given account after that many is 2 × 2^-8.
_WARM_UP_SESSIONS = 8


def run(servers: BenchServers, plan: Plan, rec: Recorder) -> None:
    accounts = concurrent_accounts(servers, plan)
    one = servers.start_bridge("workers-1", "[server]\nworkers = 1\n")
    two = servers.start_bridge("workers-2", "[server]\nworkers = 2\n")
    rec.add("workers_listening", "bridge_w2", two.wait_workers(2))
    targets = [
        servers.targets[0],
        Target("bridge", "127.0.0.1", one.port),
        Target("bridge_w2", "127.0.0.1", two.port),
    ]
    progress("workers: warm-up")
    # Each worker keeps its own parked connections, and a connection goes to whichever
    # worker accepts it first, not to the one that served its account last: a deployment
    # that has run a while has every account's connection parked in every worker, which one
    # warm-up session per account would leave to chance (about half the timed logins of the
    # first round would be fresh ones). Every target gets the same warm-up.
    for _session in range(_WARM_UP_SESSIONS):
        for target in targets:
            for account in accounts:
                scenarios.measure_setup(target, account)
    for round_number in range(plan.workers_rounds):
        order = rotated(targets, round_number)
        progress(f"workers round {round_number + 1}/{plan.workers_rounds}: {', '.join(t.name for t in order)}")
        for target in order:
            result = scenarios.measure_concurrent(target, accounts, plan.workers_sessions, count_failures=True)
            rec.add("concurrent_workers", target.name, result)
    rec.add("bridge_log", "workers-1", one.log_summary())
    rec.add("bridge_log", "workers-2", two.log_summary())
    # A worker that exited while the supervisor ran (it restarts it): sessions in between fail.
    rec.add("workers_restarted", "bridge_w2", _log_events(two, "worker_exited"))
    one.stop()
    two.stop()


def _log_events(bridge: BridgeProcess, event: str) -> int:
    needle = f'"event": "{event}"'
    return sum(needle in line for line in bridge.log_path.read_text(errors="replace").splitlines())


def rows(rec: Recorder, plan: Plan) -> list[Row | Fact]:
    ms = 1000.0
    c = plan.concurrent_clients
    w1 = "bridge, workers = 1"
    failed = {
        name: sum(sample.get("failed", 0) for sample in rec.values("concurrent_workers", name))
        for name in ("native", "bridge", "bridge_w2")
    }
    out: list[Row | Fact] = [
        Row(f"{c} clients, workers = 1: sessions/s", "concurrent_workers", "sessions_per_second", 1.0, True, ()),
        Row(
            f"{c} clients, workers = 2: sessions/s", "concurrent_workers", "sessions_per_second", 1.0, True,
            (("bridge", 1.0),), subject="bridge_w2", against_text=w1,
        ),
        Row(f"{c} clients, workers = 1: p95 (ms)", "concurrent_workers", "p95_seconds", ms, False, ()),
        Row(
            f"{c} clients, workers = 2: p95 (ms)", "concurrent_workers", "p95_seconds", ms, False,
            (("bridge", 1.0),), subject="bridge_w2", against_text=w1,
        ),
    ]
    if rec.values("concurrent_workers", "bridge_w2"):
        restarted = rec.values("workers_restarted", "bridge_w2")
        listening = rec.values("workers_listening", "bridge_w2")
        out.append(Fact(
            f"{c} clients: failed sessions, workers = 1 / workers = 2 (worker restarts)",
            f"{failed['bridge']} / {failed['bridge_w2']} ({restarted[0] if restarted else 'n/a'})",
            "none", failed["bridge"] == failed["bridge_w2"] == 0 and restarted == [0],
            {"failed": failed, "workers_listening": listening, "worker_exited_events": restarted},
            native=str(failed["native"]),
        ))
    return out
