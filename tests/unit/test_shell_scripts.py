"""The shell scripts README and CI run (scripts/, .ci/run) all run under `set -o pipefail`.
There, a pipeline into a reader that may stop before its input ends (`grep -q`, `grep -m`,
`head`) fails whenever the writer still had something to write: the writer dies of SIGPIPE and
the pipeline's status is its 141, although the reader found what it looked for. Whether the
writer was done first is a race, so such a check passes on one machine and fails in CI (it
did: check-image's `podman logs bridge | grep -q`, on 2026-12-01). The scripts take the whole
output first and search it afterwards."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A pipe (not `||`) into grep with -q or -m among its options, or into head.
EARLY_STOPPING_READER = re.compile(r"(?<![|])\|\s*(?:grep\s+(?:-\w*\s+)*-\w*[qm]\w*\b|head\b)")


def shell_scripts() -> list[Path]:
    candidates = [REPO / ".ci" / "run", *sorted((REPO / "scripts").rglob("*"))]
    return [
        path for path in candidates
        if path.is_file() and (path.suffix == ".sh" or path.read_text(errors="replace").startswith("#!/usr/bin/env bash"))
    ]


def test_the_scripts_are_found() -> None:
    names = {path.relative_to(REPO).as_posix() for path in shell_scripts()}
    assert {".ci/run", "scripts/check-image", "scripts/check-fresh-machine", "scripts/test", "scripts/demo"} <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda path: path.relative_to(REPO).as_posix())
def test_no_pipeline_ends_in_a_reader_that_stops_early(script: Path) -> None:
    offending = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(script.read_text().splitlines(), start=1)
        if not line.lstrip().startswith("#") and EARLY_STOPPING_READER.search(line.split(" # ")[0])
    ]
    assert offending == []


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ("podman logs bridge 2>&1 | grep -q '\"event\": \"shutdown\"' ||", True),
        ("until podman logs upstream 2>&1 | grep -Eq 'ready'; do", True),
        ("ss -tn | grep -m1 ESTAB", True),
        ("git log --oneline | head -5", True),
        ("grep -Eq -- \"$2\" <<<\"$output\"", False),
        ("command -v podman >/dev/null || die 'no podman'", False),
        ("printf '%s\\n' \"$out\" | grep -v '^$' >&2", False),
    ],
)
def test_the_check_tells_early_stopping_readers_apart(line: str, flagged: bool) -> None:
    assert bool(EARLY_STOPPING_READER.search(line)) is flagged


def test_such_a_pipeline_fails_under_pipefail_although_grep_found_its_line() -> None:
    # The writer keeps writing until the pipe is gone, as `podman logs` with more lines does.
    script = "set -o pipefail; (echo found; while sleep 0.01; do echo more; done) | grep -q found"
    status = subprocess.run(["bash", "-c", script], timeout=60).returncode
    assert status == 141  # 128 + SIGPIPE: the writer's status, not grep's 0
