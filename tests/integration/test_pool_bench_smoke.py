"""The benchmark (bench/, docs/performance.md) runs end to end in its tiny mode: three real
servers, the same client against each, a table and the raw JSON. Nothing here looks at the
timings; they belong to the benchmark, not to tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_benchmark_runs_end_to_end_in_tiny_mode(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--size", "tiny", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2],
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    for label in ("first (ms)", "warm (ms)", "session set-up", "RETR", "download", "sessions/s", "p95", "idle sessions", "RSS growth"):
        assert label in table, f"{label!r} missing from:\n{table}"
    data = json.loads(output.read_text())
    for metric in ("poll_first", "poll_warm", "setup", "retr_big", "download", "concurrent"):
        assert set(data["samples"][metric]) == {"native", "imapc", "bridge"}, metric
    assert data["samples"]["idle_rss"]["bridge"][0]["sessions"] == data["plan"]["idle_sessions"]


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
