"""Log format selection (bridge.ops.logs): JSON lines when stdout is not a terminal (a
container, systemd, a pipe), readable console output on a terminal, either forced by config."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from bridge.ops.logs import configure_logging, get_logger
from bridge.ops.secrets import MASK


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


class _Capture(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def _log_one(fmt: str, stream: io.TextIOBase) -> None:
    configure_logging("info", fmt, stream=stream)  # type: ignore[arg-type]
    get_logger().info("config_reloaded", changed=["logging.level"], password="hunter2")


def test_auto_writes_json_lines_when_not_on_a_terminal() -> None:
    out = _Capture(tty=False)
    _log_one("auto", out)
    event = json.loads(out.getvalue())
    assert event["event"] == "config_reloaded" and event["changed"] == ["logging.level"]
    assert event["level"] == "info" and "timestamp" in event
    assert event["password"] == MASK


def test_auto_writes_readable_lines_on_a_terminal() -> None:
    out = _Capture(tty=True)
    _log_one("auto", out)
    text = out.getvalue()
    assert "config_reloaded" in text and "hunter2" not in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize(("fmt", "is_json"), [("json", True), ("console", False)])
def test_format_can_be_forced(fmt: str, is_json: bool) -> None:
    out = _Capture(tty=not is_json)  # the opposite of what auto would pick
    _log_one(fmt, out)
    text = out.getvalue().strip()
    assert text.startswith("{") is is_json
    assert "config_reloaded" in text


def test_a_state_key_in_an_event_is_masked() -> None:
    out = _Capture(tty=False)
    configure_logging("info", "json", stream=out)  # type: ignore[arg-type]
    get_logger().info("config_loaded", state_key="0123456789abcdef0123456789abcdef")
    assert json.loads(out.getvalue())["state_key"] == MASK
