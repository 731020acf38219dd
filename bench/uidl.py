"""What the UIDL features cost (docs/performance.md, "UIDLs"): `python -m bench.run --uidl`.

One run starts a store Dovecot and two bridges in front of it (subprocesses): "off" with the
defaults, "on" with `[uidl] keep_across_uidvalidity = true` (fingerprints kept). It measures:

- `uidl import` of an account of `import_messages` messages (the command line, end to end:
  Python start-up, the old server's UIDL/LIST/TOP, every IMAP header, the match, the
  records written); the old server is the store's own POP3, so every message matches;
- the first poll (login, STAT, UIDL, LIST, QUIT) of a `listing_messages`-message account
  neither bridge has seen, on each bridge: "on" also reads every header and writes the
  fingerprints;
- the warm poll of an unchanged `warm_messages`-message account, on each bridge: with
  fingerprints on it must stay within 10% of off. Before it is timed, each bridge polls the
  account once (the first poll, fingerprints taken) and then `settle_polls` times: a device
  polls every few minutes, not right after its first poll, and Dovecot does work of its own
  in the seconds after a session read every header. The bridges' CPU time per warm poll is
  measured too (/proc/PID/schedstat), which the machine's other load disturbs less than
  wall time.

Polls alternate between the bridges and the order rotates per round.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.pop3client import poll
from bench.scenarios import Account, make_accounts
from bench.servers import BridgeProcess
from sandbox import DovecotSandbox, numbered_messages

STATE_KEY = "benchmark state key, at least 32 characters long"
_STORE = """
mail_max_userip_connections = 500
"""
WARM_LIMIT = 1.1


@dataclass(frozen=True)
class UidlPlan:
    rounds: int
    import_messages: int
    listing_messages: int
    listing_rounds: int
    warm_messages: int
    warm_polls: int
    settle_polls: int


PLANS = {
    "full": UidlPlan(rounds=5, import_messages=10_000, listing_messages=50_000, listing_rounds=2, warm_messages=5_000, warm_polls=20,
                     settle_polls=20),
    "quick": UidlPlan(rounds=2, import_messages=2_000, listing_messages=10_000, listing_rounds=1, warm_messages=1_000, warm_polls=5,
                      settle_polls=10),
    # For the smoke test: proves the pipeline works, measures nothing worth reading.
    "tiny": UidlPlan(rounds=1, import_messages=20, listing_messages=30, listing_rounds=1, warm_messages=20, warm_polls=1,
                     settle_polls=1),
}


def _progress(text: str) -> None:
    print(f"[bench uidl] {text}", file=sys.stderr, flush=True)


def _poll(bridge: BridgeProcess, account: Account, expected: int) -> float:
    seconds, count = poll("127.0.0.1", bridge.port, account.user, account.password)
    if count != expected:
        raise RuntimeError(f"STAT says {count} messages, expected {expected}")
    return seconds


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread so far, in nanoseconds' precision (schedstat;
    /proc/PID/stat counts in clock ticks, too coarse for a few milliseconds)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _import(workdir: Path, store: DovecotSandbox, account: Account, expected: int) -> float:
    config = workdir / "import.toml"
    config.write_text(
        f'[upstream]\nhost = "127.0.0.1"\nport = {store.imap_port}\ntls = "none"\n'
        f'[delete]\nstate_key = "{STATE_KEY}"\n[uidl]\nimported = true\n'
    )
    password = workdir / "import.pw"
    password.write_text(account.password)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "uidl", "import", "--config", str(config), "--from",
         f"pop3://127.0.0.1:{store.pop3_port}", account.user, "--password-file", str(password)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or f"recorded: {expected} matched" not in result.stdout:
        raise RuntimeError(f"uidl import failed:\n{result.stdout}{result.stderr}")
    return elapsed


def run(plan: UidlPlan) -> dict[str, dict[str, list[float]]]:
    """The raw samples: metric -> bridge ("off", "on", or "import") -> seconds."""
    samples: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, target: str, value: float) -> None:
        samples.setdefault(metric, {}).setdefault(target, []).append(value)

    workdir = Path(tempfile.mkdtemp(prefix="bridge-bench-uidl-"))
    workdir.chmod(0o755)
    bridges: dict[str, BridgeProcess] = {}
    try:
        with DovecotSandbox(workdir / "store", extra_config=_STORE) as store:
            for name, extra in (("off", ""), ("on", f'\n[uidl]\nkeep_across_uidvalidity = true\n[delete]\nstate_key = "{STATE_KEY}"\n')):
                (workdir / name).mkdir()
                bridges[name] = BridgeProcess(workdir / name, store.imap_port, extra)
                bridges[name].start()
            _progress("seeding")
            imported = make_accounts(store, 1, list(numbered_messages(plan.import_messages)))[0]
            listing = [make_accounts(store, 2, list(numbered_messages(plan.listing_messages))) for _ in range(plan.listing_rounds)]
            warm = make_accounts(store, 1, list(numbered_messages(plan.warm_messages)))[0]
            for round_number in range(plan.rounds):
                _progress(f"import {round_number + 1}/{plan.rounds}")
                add("import", "import", _import(workdir, store, imported, plan.import_messages))
            for round_number, (first, second) in enumerate(listing):
                order = ["off", "on"] if round_number % 2 == 0 else ["on", "off"]
                _progress(f"first poll of {plan.listing_messages:,} messages, round {round_number + 1}: {', '.join(order)}")
                for name, account in zip(order, (first, second), strict=True):
                    add("poll_first", name, _poll(bridges[name], account, plan.listing_messages))
            for _ in range(1 + plan.settle_polls):  # the first poll, then settling: not timed
                for name in bridges:
                    _poll(bridges[name], warm, plan.warm_messages)
            for round_number in range(plan.rounds):
                order = ["off", "on"] if round_number % 2 == 0 else ["on", "off"]
                _progress(f"warm polls, round {round_number + 1}/{plan.rounds}")
                cpu = {name: _cpu_seconds(bridge.pid) for name, bridge in bridges.items()}
                for _ in range(plan.warm_polls):
                    for name in order:
                        add("poll_warm", name, _poll(bridges[name], warm, plan.warm_messages))
                for name, bridge in bridges.items():
                    add("poll_warm_cpu", name, (_cpu_seconds(bridge.pid) - cpu[name]) / plan.warm_polls)
    finally:
        for bridge in bridges.values():
            bridge.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return samples


def summarise(samples: dict[str, dict[str, list[float]]], plan: UidlPlan) -> tuple[str, list[dict[str, Any]]]:
    def median(metric: str, target: str) -> float | None:
        values = samples.get(metric, {}).get(target)
        return statistics.median(values) if values else None

    ms = 1000.0
    lines = [
        "| measurement | fingerprints off | fingerprints on | on/off | target | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    verdicts: list[dict[str, Any]] = []
    imported = median("import", "import")
    if imported is not None:
        lines.append(f"| uidl import, {plan.import_messages:,} msgs (ms) | {imported * ms:,.1f} | | | | |")
    for metric, label, limit in (
        ("poll_first", f"first poll {plan.listing_messages:,} msgs (ms)", None),
        ("poll_warm", f"warm poll {plan.warm_messages:,} msgs (ms)", WARM_LIMIT),
        ("poll_warm_cpu", f"bridge CPU per warm poll {plan.warm_messages:,} msgs (ms)", None),
    ):
        off, on = median(metric, "off"), median(metric, "on")
        ratio = on / off if on is not None and off else None
        met = limit is None or (ratio is not None and ratio <= limit)
        if limit is not None:
            verdicts.append({"row": label, "limit": limit, "ratio": ratio, "met": met})
        shown = "n/a" if ratio is None else f"{ratio:.2f}"
        target = f"≤ {limit}× off" if limit else ""
        verdict = ("yes" if met else "**no**") if limit else ""
        off_text = "n/a" if off is None else f"{off * ms:,.1f}"
        on_text = "n/a" if on is None else f"{on * ms:,.1f}"
        lines.append(f"| {label} | {off_text} | {on_text} | {shown} | {target} | {verdict} |")
    return "\n".join(lines), verdicts
