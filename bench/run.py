"""Benchmark the bridge against Dovecot's native POP3 and Dovecot-on-imapc, side by side.

    .venv/bin/python -m bench.run            # the full run (about 5-10 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick    # smaller mailboxes, fewer rounds
    .venv/bin/python -m bench.run --uidl     # the UIDL features' costs instead (bench/uidl.py)

One run starts a store Dovecot (maildir; native POP3 + IMAP), an imapc Dovecot in front of
it and the bridge (subprocess) in front of it, seeds the mailboxes over IMAP, then drives
all three with the same client. Rounds are interleaved and the order rotates per round, so
drift of the machine hits all three alike. Prints medians and the ratios bridge/native and
bridge/imapc as a Markdown table (pasted into docs/performance.md) and writes every raw
sample to bench/results/ (not in git).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.servers import BenchServers, Target
from sandbox import big_message, numbered_messages

MIB = 1024 * 1024
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
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


PLANS = {
    "full": Plan(
        rounds=5, poll_messages=5000, warm_polls=3, setup_sessions=20, big_size=32 * MIB,
        small_size=1 * MIB, download_messages=1000, concurrent_clients=100,
        concurrent_sessions=3, concurrent_messages=10, idle_sessions=1000,
    ),
    "quick": Plan(
        rounds=2, poll_messages=1000, warm_polls=2, setup_sessions=5, big_size=4 * MIB,
        small_size=256 * 1024, download_messages=200, concurrent_clients=20,
        concurrent_sessions=2, concurrent_messages=5, idle_sessions=100,
    ),
    # For the smoke test: proves the whole pipeline works, measures nothing worth reading.
    "tiny": Plan(
        rounds=1, poll_messages=20, warm_polls=1, setup_sessions=1, big_size=200 * 1024,
        small_size=50 * 1024, download_messages=5, concurrent_clients=2,
        concurrent_sessions=1, concurrent_messages=2, idle_sessions=3,
    ),
}

TARGET_NAMES = ("native", "imapc", "bridge")


def _progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def machine_description() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        dovecot = subprocess.run(
            ["dovecot", "--version"], capture_output=True, text=True, check=False,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"},
        ).stdout.split()[0]
    except (OSError, IndexError):
        dovecot = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": dovecot,
    }


class Recorder:
    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))

    def add(self, metric: str, target: str, value: Any) -> None:
        self.samples[metric][target].append(value)

    def median(self, metric: str, target: str, key: str | None = None) -> float | None:
        values = self.samples.get(metric, {}).get(target)
        if not values:
            return None
        return statistics.median(v[key] if key else v for v in values)


def _seed(servers: BenchServers, plan: Plan) -> dict[str, Any]:
    store = servers.store
    make = scenarios.make_accounts
    _progress("seeding mailboxes over IMAP")
    poll_corpus = list(numbered_messages(plan.poll_messages))
    # A fresh mailbox per round and server: "first poll" means that server has never seen it.
    first = [
        dict(zip(TARGET_NAMES, make(store, len(TARGET_NAMES), poll_corpus), strict=True))
        for _ in range(plan.rounds)
    ]
    accounts: dict[str, Any] = {
        "poll": first,
        "setup": make(store, 1, list(numbered_messages(10)))[0],
        "big": make(store, 1, [big_message(plan.big_size), big_message(plan.small_size, tag="small")])[0],
        "download": make(store, 1, list(numbered_messages(plan.download_messages)))[0],
        "concurrent": make(store, plan.concurrent_clients, list(numbered_messages(plan.concurrent_messages))),
        "idle": make(store, plan.idle_sessions, list(numbered_messages(3))),
    }
    return accounts


def _rotated(targets: list[Target], round_number: int) -> list[Target]:
    shift = round_number % len(targets)
    return targets[shift:] + targets[:shift]


def _warm_up(targets: list[Target], accounts: dict[str, Any], plan: Plan) -> None:
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
        order = _rotated(targets, round_number)
        _progress(f"round {round_number + 1}/{plan.rounds}: {', '.join(t.name for t in order)}")
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
            rec.add("download", target.name, scenarios.measure_download(target, accounts["download"], plan.download_messages))
        for target in order:
            rec.add(
                "concurrent", target.name,
                scenarios.measure_concurrent(target, accounts["concurrent"], plan.concurrent_sessions),
            )


def run_memory(servers: BenchServers, accounts: dict[str, Any], plan: Plan, rec: Recorder) -> None:
    bridge = next(t for t in servers.targets if t.name == "bridge")
    pid = servers.bridge.pid
    _progress(f"bridge memory: {plan.idle_sessions} idle sessions")
    rec.add("idle_rss", "bridge", scenarios.measure_idle_sessions(bridge, pid, accounts["idle"]))
    _progress("bridge memory: RETR growth")
    for number, size in ((2, plan.small_size), (1, plan.big_size)):
        rec.add(f"retr_rss_{size}", "bridge", scenarios.measure_retr_memory(bridge, pid, accounts["big"], number, size))


# -- the report ------------------------------------------------------------------------------


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


@dataclass(frozen=True)
class Row:
    label: str
    metric: str
    key: str | None
    scale: float
    higher_is_better: bool
    # (against, limit): the bridge's ratio to `against` must stay within `limit`.
    targets: tuple[tuple[str, float], ...]


def _rows(plan: Plan) -> list[Row]:
    ms = 1000.0
    big = f"{plan.big_size // MIB} MiB" if plan.big_size >= MIB else f"{plan.big_size // 1024} KiB"
    return [
        Row(f"poll {plan.poll_messages:,} msgs, first (ms)", "poll_first", None, ms, False, (("imapc", 0.5),)),
        Row(f"poll {plan.poll_messages:,} msgs, warm (ms)", "poll_warm", None, ms, False, (("native", 1.2), ("imapc", 0.5))),
        Row("session set-up to STAT (ms)", "setup", None, ms, False, (("native", 1.3),)),
        Row(f"RETR {big} (ms)", "retr_big", None, ms, False, (("native", 1.5),)),
        Row(f"download {plan.download_messages:,} msgs (ms)", "download", None, ms, False, (("native", 1.5),)),
        Row(f"{plan.concurrent_clients} clients: sessions/s", "concurrent", "sessions_per_second", 1.0, True, (("native", 0.8),)),
        Row(f"{plan.concurrent_clients} clients: p95 (ms)", "concurrent", "p95_seconds", ms, False, (("native", 1.5),)),
    ]


def summarise(rec: Recorder, plan: Plan) -> tuple[str, list[dict[str, Any]]]:
    lines = [
        "| measurement | native | imapc | bridge | bridge/native | bridge/imapc | target | met |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    verdicts: list[dict[str, Any]] = []
    for row in _rows(plan):
        values = {name: rec.median(row.metric, name, row.key) for name in TARGET_NAMES}
        ratios = {name: _ratio(values["bridge"], values[name]) for name in ("native", "imapc")}
        met = []
        for against, limit in row.targets:
            ratio = ratios[against]
            ok = ratio is not None and (ratio >= limit if row.higher_is_better else ratio <= limit)
            met.append(ok)
            verdicts.append({"row": row.label, "against": against, "limit": limit, "ratio": ratio, "met": ok})
        sign = "≥" if row.higher_is_better else "≤"
        target_text = ", ".join(f"{sign} {limit}× {against}" for against, limit in row.targets)
        lines.append(
            f"| {row.label} | {_fmt(values['native'], row.scale)} | {_fmt(values['imapc'], row.scale)} "
            f"| {_fmt(values['bridge'], row.scale)} | {_fmt(ratios['native'], digits=2)} "
            f"| {_fmt(ratios['imapc'], digits=2)} | {target_text} | {'yes' if all(met) else '**no**'} |"
        )
    idle = rec.samples.get("idle_rss", {}).get("bridge")
    if idle:
        sample = idle[0]
        mib = sample["rss_with_sessions"] / MIB
        ok = mib <= 200
        verdicts.append({"row": "idle sessions RSS", "limit_mib": 200, "mib": mib, "met": ok})
        lines.append(
            f"| bridge RSS with {sample['sessions']:,} idle sessions (MiB) | | | {mib:,.1f} "
            f"| | | ≤ 200 MiB (at start: {sample['rss_before'] / MIB:,.1f}) | {'yes' if ok else '**no**'} |"
        )
    small = rec.samples.get(f"retr_rss_{plan.small_size}", {}).get("bridge")
    large = rec.samples.get(f"retr_rss_{plan.big_size}", {}).get("bridge")
    if small and large:
        g_small, g_large = small[0]["growth"] / MIB, large[0]["growth"] / MIB
        # Flat: the bigger message costs at most a few fetch chunks more than the small one.
        ok = g_large <= g_small + 4
        verdicts.append({"row": "RETR memory flat", "small_mib": g_small, "large_mib": g_large, "met": ok})
        lines.append(
            f"| bridge RSS growth during RETR {plan.small_size // 1024:,} KiB / {plan.big_size // 1024:,} KiB (MiB) "
            f"| | | {g_small:,.1f} / {g_large:,.1f} | | | flat in size | {'yes' if ok else '**no**'} |"
        )
    return "\n".join(lines), verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="a smaller run")
    parser.add_argument("--size", choices=sorted(PLANS))
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--engine", help='set the bridge\'s [upstream] engine (e.g. "trio", "aioimaplib")')
    parser.add_argument("--bridge-toml", default="", help="extra TOML lines for the bridge's [upstream] section")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the bridge memory measurements")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the servers' files and logs")
    parser.add_argument("--output", type=Path, help="where to write the raw JSON (default: bench/results/)")
    parser.add_argument("--uidl", action="store_true", help="measure the UIDL features instead (bench/uidl.py)")
    parser.set_defaults(size="full")
    args = parser.parse_args(argv)
    if args.uidl:
        return _run_uidl(args)
    plan = PLANS[args.size]
    if args.rounds:
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    upstream_toml = args.bridge_toml
    if args.engine:
        upstream_toml += f'\nengine = "{args.engine}"'
    started = dt.datetime.now(dt.UTC)
    machine = machine_description()
    rec = Recorder()
    with BenchServers(bridge_toml=upstream_toml, keep_workdir=args.keep_workdir) as servers:
        targets = servers.targets
        accounts = _seed(servers, plan)
        _progress("warm-up")
        _warm_up(targets, accounts, plan)
        run_rounds(targets, accounts, plan, rec)
        if not args.skip_memory:
            try:
                run_memory(servers, accounts, plan, rec)
            except Exception as exc:  # keep the timings measured so far
                _progress(f"memory measurement failed: {exc}; bridge log tail:")
                print(servers.bridge.log_path.read_text()[-3000:], file=sys.stderr)
                rec.add("memory_error", "bridge", str(exc))
    table, verdicts = summarise(rec, plan)
    header = (
        f"{started:%Y-%m-%d}, `bench.run --size {args.size}` ({plan.rounds} rounds), "
        f"bridge engine: {args.engine or 'default'}; {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, Python {machine['python']}, "
        f"Dovecot {machine['dovecot']}, loopback."
    )
    print(header)
    print()
    print(table)
    output = args.output or RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}-{args.size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "plan": asdict(plan),
                "engine": args.engine,
                "machine": machine,
                "samples": rec.samples,
                "verdicts": verdicts,
                "table": table,
            },
            indent=1,
        )
    )
    _progress(f"raw samples: {output}")
    return 0


def _run_uidl(args: argparse.Namespace) -> int:
    from bench import uidl

    plan = uidl.PLANS[args.size]
    if args.rounds:
        plan = uidl.UidlPlan(**{**asdict(plan), "rounds": args.rounds})
    started = dt.datetime.now(dt.UTC)
    machine = machine_description()
    samples = uidl.run(plan)
    table, verdicts = uidl.summarise(samples, plan)
    print(
        f"{started:%Y-%m-%d}, `bench.run --uidl --size {args.size}` ({plan.rounds} rounds); {machine['cpu']}, "
        f"{machine['cores']} cores, Python {machine['python']}, Dovecot {machine['dovecot']}, loopback.\n"
    )
    print(table)
    output = args.output or RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}-uidl-{args.size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"started": started.isoformat(), "plan": asdict(plan), "machine": machine, "samples": samples,
                    "verdicts": verdicts, "table": table}, indent=1)
    )
    _progress(f"raw samples: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
