"""Prometheus metrics of the service, served by the admin listener (`bridge.ops.admin`).

The metrics live in prometheus_client's default registry. With `[server] workers` > 1 the
supervisor starts every worker with PROMETHEUS_MULTIPROC_DIR set, so prometheus_client keeps
the values in per-process files that the supervisor adds up on /metrics (`aggregated_registry`);
gauges say how to combine the workers (`multiprocess_mode`), and are ignored in one process.

Label values come from small closed sets (command names, outcomes, policies, reasons), never
from user names or peers: a label per user would grow without bound.
"""

from __future__ import annotations

import time
from functools import cache
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

# The *_created timestamp series double the output and no dashboard here uses them.
disable_created_metrics()

SESSIONS_ACTIVE = Gauge(
    "bridge_sessions_active", "POP3 sessions open now.", multiprocess_mode="livesum"
)
SESSIONS = Counter(
    "bridge_sessions", "POP3 sessions ended, by outcome (quit, autologout, client_gone, shutdown, ...).",
    ["outcome"],
)
LOGINS = Counter("bridge_logins", "Login attempts by result (ok, failed).", ["result"])
LOGIN_FAILURES = Counter(
    "bridge_login_failures", "Failed logins by reason (credentials, upstream, in_use, ...).", ["reason"]
)
COMMANDS = Counter(
    "bridge_commands",
    "Commands that need the upstream (RETR, TOP, QUIT), by result (ok, err, error).",
    ["command", "result"],
)
BYTES_SENT = Counter("bridge_bytes_sent", "Bytes sent to POP3 clients.")
RETRIEVE_SECONDS = Histogram(
    "bridge_retrieve_seconds",
    "Time to send one message (RETR) or its top (TOP), first upstream FETCH to terminator.",
    ["command"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
READAHEAD_HITS = Counter(
    "bridge_readahead_hits", "RETRs answered from the read-ahead, without a FETCH of their own."
)
MESSAGE_CACHE_HITS = Counter(
    "bridge_message_cache_hits", "RETRs of big messages sent from the message cache instead of the upstream."
)
MESSAGE_CACHE_BYTES = Gauge(
    "bridge_message_cache_bytes", "Bytes of messages held in the message cache (temporary files).",
    multiprocess_mode="livesum",
)
MESSAGE_SPOOL_BYTES = Gauge(
    "bridge_message_spool_bytes",
    "Bytes set aside in the message cache's budget for slow readers' spools (bridge/session/message_cache.py).",
    multiprocess_mode="livesum",
)
UPSTREAM_CONNECTS = Counter(
    "bridge_upstream_connects", "IMAP connections opened (TCP connect and greeting received)."
)
UPSTREAM_CONNECT_FAILURES = Counter(
    "bridge_upstream_connect_failures",
    "IMAP connections that could not be opened, by reason (timeout, refused, greeting).",
    ["reason"],
)
UPSTREAM_REUSES = Counter(
    "bridge_upstream_connection_reuses", "Sessions served by an already open, pooled IMAP connection."
)
UPSTREAM_POOLED = Gauge(
    "bridge_upstream_pooled_connections", "Idle IMAP connections held in the pool.",
    multiprocess_mode="livesum",
)
POOL_EVICTIONS = Counter(
    "bridge_pool_evictions",
    "IMAP connections logged out by the pool, by reason (expired, max_age, account_cap, total_cap (a parked "
    "one, to make room), idle_session (the connection of a session between commands, to make room), "
    "password_changed, upstream_changed, route_changed, shutdown).",
    ["reason"],
)
POOL_MAX_CONNECTIONS = Gauge(
    "bridge_pool_max_connections", "pool.max_connections: the most IMAP connections open at once (per process).",
    multiprocess_mode="livesum",
)
UPSTREAM_CONNECTIONS = Gauge(
    "bridge_upstream_connections",
    "IMAP connections open now: in use by sessions, parked, being opened or logged out.",
    multiprocess_mode="livesum",
)
POOL_FULL = Counter(
    "bridge_pool_full",
    "Logins and commands that found every IMAP connection (pool.max_connections) in use until their timeout.",
)
DELETIONS_APPLIED = Counter(
    "bridge_deletions_applied", "Messages deleted, moved, kept or hidden at QUIT, by delete policy.",
    ["policy"],
)
OAUTH2_REFRESHES = Counter(
    "bridge_oauth2_refreshes",
    "Requests to the OAuth2 token endpoint for logins (a refresh, or a new token for the app-only "
    "grants), by outcome (ok, invalid_grant, refused, unavailable).",
    ["outcome"],
)
OAUTH2_REENROLMENT_NEEDED = Gauge(
    "bridge_oauth2_accounts_needing_reenrolment",
    "Accounts whose OAuth2 grant died (invalid_grant) as this process last saw them at a login; "
    "the log event oauth2_reenrolment_needed names each, `pop3-imap-bridge oauth2 list` shows all.",
    multiprocess_mode="max",
)

# Per back end (a route's name, "default" for [upstream], a server a lookup named): bounded by
# the configuration, never by account.
BACKEND_LOGINS = Counter(
    "bridge_backend_logins", "Logins by back end and result (ok, credentials, upstream).", ["backend", "result"]
)
BACKEND_CONNECT_SECONDS = Histogram(
    "bridge_backend_connect_seconds",
    "Time to open a fresh IMAP connection (connect, TLS, greeting, login), by back end.",
    ["backend"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BACKEND_POOLED = Gauge(
    "bridge_backend_pooled_connections", "Idle IMAP connections held in the pool, by back end.", ["backend"],
    multiprocess_mode="livesum",
)
BACKEND_ERRORS = Counter(
    "bridge_backend_errors",
    "Upstream failures in sessions, by back end and operation (login, retrieve, quit).",
    ["backend", "operation"],
)
LOOKUPS = Counter(
    "bridge_lookups", "Requests to the routing lookup service, by result (ok, cached, refused, unavailable).",
    ["result"],
)

# Login failure reasons known in advance, so a dashboard sees a 0 instead of no series.
for _reason in ("credentials", "upstream", "in_use"):
    LOGIN_FAILURES.labels(_reason)
for _result in ("ok", "failed"):
    LOGINS.labels(_result)
for _outcome in ("ok", "invalid_grant", "refused", "unavailable"):
    OAUTH2_REFRESHES.labels(_outcome)


for _result in ("ok", "cached", "refused", "unavailable"):
    LOOKUPS.labels(_result)
POOL_EVICTIONS.labels("total_cap")
POOL_EVICTIONS.labels("idle_session")


@cache
def backend_connect_time(backend: str) -> Any:
    return BACKEND_CONNECT_SECONDS.labels(backend)


@cache
def backend_pooled(backend: str) -> Any:
    return BACKEND_POOLED.labels(backend)


def backend_login(backend: str, result: str) -> Any:
    return BACKEND_LOGINS.labels(backend, result)


def backend_error(backend: str, operation: str) -> Any:
    return BACKEND_ERRORS.labels(backend, operation)


# `labels()` validates and looks up its arguments under a lock on every call (about 4 µs);
# sessions count every command, so they keep the children.
@cache
def command_count(command: str, result: str) -> Any:
    """The COMMANDS child for this command and result."""
    return COMMANDS.labels(command, result)


@cache
def retrieve_time(command: str) -> Any:
    """The RETRIEVE_SECONDS child for RETR or TOP."""
    return RETRIEVE_SECONDS.labels(command)


def supervisor_metrics(registry: CollectorRegistry) -> Counter:
    """The supervisor's own metric, next to the workers' sums: worker restarts."""
    return Counter("bridge_worker_restarts", "Worker processes restarted after exiting unexpectedly.", registry=registry)


def aggregated_registry(multiprocess_dir: str) -> CollectorRegistry:
    """A registry adding up what the worker processes wrote to `multiprocess_dir`."""
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)
    return registry


def forget_process(pid: int, multiprocess_dir: str) -> None:
    """Drop a dead worker's live gauges (its counters keep counting towards the totals)."""
    _multiprocess.mark_process_dead(pid, multiprocess_dir)


def register_collector(collector: Any, registry: CollectorRegistry | None = None) -> None:
    """Add a collector (e.g. the back ends' health) to `registry` (default: this process's)."""
    from prometheus_client import REGISTRY

    (registry or REGISTRY).register(collector)


def unregister_collector(collector: Any, registry: CollectorRegistry | None = None) -> None:
    from prometheus_client import REGISTRY

    (registry or REGISTRY).unregister(collector)


def render(registry: CollectorRegistry | None = None) -> bytes:
    """The Prometheus text exposition of `registry` (default: this process's metrics)."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return generate_latest(registry)


class CommandTimer:
    """Counts and times one RETR, TOP or QUIT (metrics, and with `log` a debug log event). A
    class, not a generator context manager: a download runs it once per message."""

    __slots__ = ("command", "log", "started", "value")

    def __init__(self, command: str, log: Any) -> None:
        self.command = command
        self.log = log
        self.value = "ok"  # "err" once the command is answered -ERR

    def __enter__(self) -> CommandTimer:
        self.started = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        command = self.command
        if exc_type is not None:
            command_count(command, "error").inc()
            return
        seconds = time.monotonic() - self.started
        command_count(command, self.value).inc()
        if command != "QUIT" and self.value == "ok":
            retrieve_time(command).observe(seconds)
        if self.log is not None:
            self.log.debug("command", command=command, ms=round(seconds * 1000, 2))
