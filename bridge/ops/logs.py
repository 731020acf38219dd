"""Structured logging: stable event names with key/value context, JSON in production.

Session context (session id, peer, user) lives in structlog's contextvars, so every event a
session's task logs carries it without being passed around. Trio gives each task a copy of the
context, so sessions never see each other's values.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from bridge.ops.secrets import MASK, is_secret_name


def _drop_secrets(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # Belt and braces: nothing should log a password, but if a key ever carries one it is masked.
    for key in event_dict:
        if is_secret_name(key):
            event_dict[key] = MASK
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog; `fmt` is "json", "console", or "auto" (console on a terminal)."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _drop_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write() per event, newline included: workers share stdout, and with
        # PYTHONUNBUFFERED (as in the Docker image) print() would issue the line and its
        # newline separately, letting two workers' lines interleave.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # aioimaplib logs every received chunk (message bodies) and sent line at debug level;
    # its records must never reach our output.
    logging.getLogger("aioimaplib").setLevel(logging.WARNING)


def get_logger(**context: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger("pop3-imap-bridge", **context)
