"""Benchmark the bridge against Dovecot's native POP3 and Dovecot-on-imapc, side by side.

    .venv/bin/python -m bench.run                  # the full run (about 12-15 minutes on 2 cores)
    .venv/bin/python -m bench.run --quick          # smaller mailboxes, fewer rounds
    .venv/bin/python -m bench.run --rows scale     # one row group only
    .venv/bin/python -m bench.run --uidl           # the UIDL features' costs instead (bench/uidl.py)

One run starts a store Dovecot (maildir; native POP3 + IMAP), an imapc Dovecot in front of
it and the bridge (subprocess) in front of it, then runs the row groups (GROUPS below), each
seeding what it needs and driving the servers with the same client. Rounds are interleaved
and the order rotates per round, so drift of the machine hits all servers alike. Prints
medians and the ratios bridge/native and bridge/imapc as a Markdown table with a verdict per
target (pasted into docs/performance.md) and writes every raw sample to bench/results/ (not
in git).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import classic, huge_mailbox, scale, slow_clients, workers
from bench.plans import PLANS, Plan
from bench.proc import raise_descriptor_limit
from bench.report import Fact, Recorder, Row, progress, summarise
from bench.servers import BenchServers

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Row groups, in the order they run and appear in the table: (name, what it measures).
GROUPS = {
    "classic": "polls, set-up, RETR, download, 100 clients, the bridge's memory",
    "huge": "a mailbox of plan.huge_messages messages: first and warm poll, snapshot memory",
    "scale": "plan.scale_sessions idle sessions on one bridge process, then RETR+DELE+QUIT",
    "slow": "plan.slow_clients slow readers and a fast poller",
    "workers": "the 100-client row with server.workers = 2 against 1",
}


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


def descriptors_needed(plan: Plan, groups: list[str]) -> int:
    """File descriptors the bench process (and the servers it starts, which inherit its
    limit) needs: the scale row's client sockets here, and in the bridge its POP3 sessions
    plus at most pool.max_connections IMAP connections."""
    needed = 4096
    if "scale" in groups:
        needed = max(needed, plan.scale_sessions + plan.scale_pool + 512)
    if "slow" in groups:
        needed = max(needed, 2 * plan.slow_clients + 512)
    return needed


def all_rows(rec: Recorder, plan: Plan) -> list[Row | Fact]:
    return [
        *classic.rows(rec, plan),
        *huge_mailbox.rows(rec, plan),
        *scale.rows(rec, plan),
        *slow_clients.rows(rec, plan),
        *workers.rows(rec, plan),
    ]


def run_group(name: str, servers: BenchServers, plan: Plan, rec: Recorder, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if name == "classic":
        classic.run(servers, plan, rec, memory=not args.skip_memory)
    elif name == "huge":
        huge_mailbox.run(servers, plan, rec)
    elif name == "scale":
        scale.run(servers, plan, rec)
    elif name == "slow":
        slow_clients.run(servers, plan, rec)
    elif name == "workers":
        workers.run(servers, plan, rec)
    elapsed = time.perf_counter() - started
    rec.add("group_seconds", name, elapsed)
    progress(f"{name} rows done in {elapsed:,.0f} s")


def _plan_override(plan: Plan, text: str) -> Plan:
    name, sep, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(Plan)}
    if not sep or name not in fields:
        raise SystemExit(f"--set wants FIELD=VALUE with FIELD one of: {', '.join(fields)}")
    kind = type(getattr(plan, name))
    converted: Any = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return dataclasses.replace(plan, **{name: converted})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="a smaller run")
    parser.add_argument("--size", choices=sorted(PLANS))
    parser.add_argument(
        "--rows", default=",".join(GROUPS),
        help="comma-separated row groups to run: " + "; ".join(f"{k}: {v}" for k, v in GROUPS.items()),
    )
    parser.add_argument("--rounds", type=int, help="override the number of rounds of the classic rows")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE",
        help="override one size of the plan (bench/plans.py), e.g. --set scale_sessions=2000",
    )
    parser.add_argument("--engine", help='set the bridge\'s [upstream] engine (e.g. "trio", "aioimaplib")')
    parser.add_argument("--bridge-toml", default="", help="extra TOML lines for the bridges' [upstream] section")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the classic rows' memory measurements")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the servers' files and logs")
    parser.add_argument("--output", type=Path, help="where to write the raw JSON (default: bench/results/)")
    parser.add_argument("--uidl", action="store_true", help="measure the UIDL features instead (bench/uidl.py)")
    parser.set_defaults(size="full")
    args = parser.parse_args(argv)
    if args.uidl:
        return _run_uidl(args)
    groups = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in groups if name not in GROUPS]
    if unknown:
        parser.error(f"unknown row group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    groups = [name for name in GROUPS if name in groups]
    plan = PLANS[args.size]
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    for text in args.set:
        plan = _plan_override(plan, text)
    try:
        limit = raise_descriptor_limit(descriptors_needed(plan, groups), f"bench.run --rows {','.join(groups)}")
    except RuntimeError as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    upstream_toml = args.bridge_toml
    if args.engine:
        upstream_toml += f'\nengine = "{args.engine}"'
    started = dt.datetime.now(dt.UTC)
    machine = {**machine_description(), "descriptor_limit": limit}
    rec = Recorder()
    failed: list[str] = []
    with BenchServers(bridge_toml=upstream_toml, keep_workdir=args.keep_workdir) as servers:
        for name in groups:
            try:
                run_group(name, servers, plan, rec, args)
            except Exception:  # keep what the other groups measure; the exit status says it
                failed.append(name)
                text = traceback.format_exc()
                progress(f"{name} rows FAILED:\n{text}")
                rec.add("group_error", name, text)
        if args.keep_workdir:
            progress(f"servers' files and logs kept in {servers.workdir}")
    table, verdicts = summarise(rec, all_rows(rec, plan))
    header = (
        f"{started:%Y-%m-%d}, `bench.run --size {args.size} --rows {','.join(groups)}` "
        f"({plan.rounds} classic rounds), bridge engine: {args.engine or 'default'}; "
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, Dovecot {machine['dovecot']}, loopback."
    )
    print(header)
    print()
    print(table)
    if failed:
        print(f"\nFAILED row groups: {', '.join(failed)} (see stderr and the JSON's group_error)")
    output = args.output or RESULTS_DIR / f"{started:%Y%m%dT%H%M%SZ}-{args.size}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "plan": dataclasses.asdict(plan),
                "rows": groups,
                "engine": args.engine,
                "machine": machine,
                "samples": rec.samples,
                "verdicts": verdicts,
                "table": table,
            },
            indent=1,
        )
    )
    progress(f"raw samples: {output}")
    return 1 if failed else 0


def _run_uidl(args: argparse.Namespace) -> int:
    from bench import uidl

    plan = uidl.PLANS[args.size]
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
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
        json.dumps({"started": started.isoformat(), "plan": dataclasses.asdict(plan), "machine": machine, "samples": samples,
                    "verdicts": verdicts, "table": table}, indent=1)
    )
    progress(f"raw samples: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
