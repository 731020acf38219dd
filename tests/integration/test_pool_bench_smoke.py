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
