"""The benchmark (bench/, docs/performance.md) runs end to end in its tiny mode: real servers,
the same clients against each, a table and the raw JSON. Nothing here looks at the timings or
at whether a target was met; they belong to the benchmark, not to tests. What is checked is
what each row must have done to mean anything: every session and slow client it counted
really happened, the deletions it reports are in the store, the connection counts were
sampled, the second bridge really ran two workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    output = tmp_path_factory.mktemp("bench") / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--size", "tiny", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads(output.read_text())


def test_classic_rows(tiny_run: tuple[str, dict[str, Any]]) -> None:
    table, data = tiny_run
    for label in ("first (ms)", "warm (ms)", "session set-up", "RETR", "download", "sessions/s", "p95", "idle sessions", "RSS growth"):
        assert label in table, f"{label!r} missing from:\n{table}"
    for metric in ("poll_first", "poll_warm", "setup", "retr_big", "download", "concurrent"):
        assert set(data["samples"][metric]) == {"native", "imapc", "bridge"}, metric
    assert data["samples"]["idle_rss"]["bridge"][0]["sessions"] == data["plan"]["idle_sessions"]


def test_download_rows_split_the_session(tiny_run: tuple[str, dict[str, Any]]) -> None:
    """The download's split is measured on every server and adds up: a session takes at
    least as long as its stalled RETRs together, and no more RETRs stall than it sent."""
    table, data = tiny_run
    for label in ("download: median RETR round trip", "download: RETRs over 0.5 ms, how many", "their time"):
        assert label in table, f"{label!r} missing from:\n{table}"
    messages = data["plan"]["download_messages"]
    for target, samples in data["samples"]["download"].items():
        assert samples, target
        for sample in samples:
            assert 0 < sample["retr_median"] < sample["seconds"], (target, sample)
            assert 0 <= sample["stalls"] <= messages, (target, sample)
            assert sample["stall_seconds"] <= sample["seconds"], (target, sample)
            assert (sample["stalls"] == 0) == (sample["stall_seconds"] == 0), (target, sample)


def test_huge_mailbox_rows(tiny_run: tuple[str, dict[str, Any]]) -> None:
    table, data = tiny_run
    samples, plan = data["samples"], data["plan"]
    # measure_poll raises unless STAT counts every message, so a sample is a complete poll.
    for metric, polls in (("poll_huge_first", plan["huge_rounds"]), ("poll_huge_warm", plan["huge_rounds"] * plan["huge_warm_polls"])):
        assert {name: len(values) for name, values in samples[metric].items()} == dict.fromkeys(("native", "imapc", "bridge"), polls)
    first = samples["huge_memory_first"]["bridge"]
    assert len(first) == plan["huge_rounds"] and all(m["peak"] >= m["rss_before"] > 0 for m in first)
    assert f"poll {plan['huge_messages']:,} msgs, first" in table


def test_scale_row(tiny_run: tuple[str, dict[str, Any]]) -> None:
    table, data = tiny_run
    sessions = data["plan"]["scale_sessions"]
    bridge = data["samples"]["scale"]["bridge"][0]
    # Every idle session came back for RETR + DELE + QUIT, got its own account's message,
    # and exactly that message is gone from the store; nobody else's mail was touched.
    assert bridge["errors"] == {}
    assert bridge["opened"] == bridge["completed"] == bridge["deleted_upstream"] == sessions
    assert bridge["mailboxes_wrong"] == 0
    # The connection counts were measured, not left at their defaults.
    assert bridge["connection_samples"] > 0
    assert bridge["most_upstream_connections"] >= 1
    assert isinstance(bridge["upstream_held"], int)
    assert bridge["pool_max_connections"] == data["plan"]["scale_pool"]
    native = data["samples"]["scale"]["native"][0]
    assert native["opened"] == sessions and native["memory"]["processes"] > 1
    assert f"{sessions:,} idle sessions: IMAP connections the bridge holds" in table


def test_slow_clients_row(tiny_run: tuple[str, dict[str, Any]]) -> None:
    table, data = tiny_run
    clients = data["plan"]["slow_clients"]
    for name in ("native", "bridge"):
        slow = data["samples"]["slow"][name][0]
        assert slow["errors"] == {} and slow["complete"] == slow["clients"] == clients, name
        # The fast poller ran alone, then while every slow client was reading.
        assert len(slow["unloaded"]) == data["plan"]["poller_baseline"] and slow["loaded"], name
    bridge = data["samples"]["slow"]["bridge"][0]
    assert bridge["peak"] >= bridge["rss_before"] > 0
    # The bridge's CPU over the row was read from its process, and the table shows it.
    assert bridge["cpu_seconds"] > 0 and data["samples"]["slow_cpu"]["bridge"] == [bridge["cpu_seconds"]]
    assert "bridge CPU over the row (s)" in table
    # What the load generator and the machine spent, for both servers.
    for name in ("native", "bridge"):
        [clients_cpu] = data["samples"]["slow_clients_cpu"][name]
        [busy] = data["samples"]["slow_machine_busy"][name]
        assert clients_cpu > 0 and 0 < busy <= (os.cpu_count() or 1) + 0.5, name
    assert "the benchmark's slow clients' own CPU (s)" in table
    assert "the machine's CPUs busy over the row (cores)" in table


def test_workers_row(tiny_run: tuple[str, dict[str, Any]]) -> None:
    table, data = tiny_run
    assert data["samples"]["workers_listening"]["bridge_w2"] == [2]
    for name in ("native", "bridge", "bridge_w2"):
        rounds = data["samples"]["concurrent_workers"][name]
        assert len(rounds) == data["plan"]["workers_rounds"] and all("failed" in r for r in rounds), name
    assert "workers = 2: sessions/s" in table


def test_verdicts_name_every_row(tiny_run: tuple[str, dict[str, Any]]) -> None:
    table, data = tiny_run
    assert data["rows"] == ["classic", "huge", "scale", "slow", "workers"]
    assert "group_error" not in data["samples"]
    for verdict in data["verdicts"]:
        assert verdict["row"] in table and verdict["met"] in (True, False, None)


def test_the_uidl_benchmark_runs_end_to_end_in_tiny_mode(tmp_path: Path) -> None:
    """`bench.run --uidl` (bench/uidl.py): an import, first polls and warm polls with
    fingerprints off and on, a table and the raw JSON; the timings are not looked at."""
    output = tmp_path / "uidl.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--uidl", "--size", "tiny", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("uidl import, 20 msgs", "first poll 30 msgs", "warm poll 20 msgs", "CPU per warm poll", "fingerprints on"):
        assert label in result.stdout, f"{label!r} missing from:\n{result.stdout}"
    data = json.loads(output.read_text())
    assert len(data["samples"]["import"]["import"]) == data["plan"]["rounds"]
    for metric in ("poll_first", "poll_warm", "poll_warm_cpu"):
        assert set(data["samples"][metric]) == {"off", "on"}, metric
