"""Helpers for the operations tests (tests/integration/test_ops_*.py): the admin endpoint over
real HTTP, the Prometheus text parsed by prometheus_client's own parser, and waiting for a
condition the service reports (never a fixed sleep)."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import SubprocessBridge

_T = TypeVar("_T")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(port: int, path: str, method: str = "GET", timeout: float = 30) -> tuple[int, str, dict[str, str]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, response.read().decode(), headers
    finally:
        connection.close()


def scrape(port: int) -> Samples:
    status, body, headers = http_get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4"), headers
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def quiet_metrics(admin_port: int) -> Samples:
    """The metrics once no POP3 session is open (every session_end has been counted). The
    admin listener may open a moment after the POP3 one: refused connections are retried."""

    def scrape_if_quiet() -> Samples | None:
        try:
            samples = scrape(admin_port)
        except ConnectionRefusedError:
            return None
        return samples if value(samples, "bridge_sessions_active") == 0 else None

    return wait_for(scrape_if_quiet, "no POP3 session open")


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled series that was never touched (no line at all)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(condition: Callable[[], _T], what: str, timeout: float = 60) -> _T:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def events_named(bridge: SubprocessBridge, name: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        event for event in bridge.events()
        if event.get("event") == name and all(event.get(k) == v for k, v in fields.items())
    ]


def wait_for_event(bridge: SubprocessBridge, name: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        assert bridge.process is not None
        matches = events_named(bridge, name, **fields)
        if matches:
            return matches[0]
        if bridge.process.poll() is not None:
            raise AssertionError(f"bridge exited ({bridge.process.returncode}) before logging {name}")
        return None

    return wait_for(found, f"log event {name} {fields or ''}", timeout)


def wait_for_exit(bridge: SubprocessBridge, timeout: float = 60) -> int:
    assert bridge.process is not None
    return bridge.process.wait(timeout)
