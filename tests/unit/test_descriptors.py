"""The descriptor limit (bridge.ops.descriptors): what the settings may need, and the soft
limit raised to the hard one at start-up (never lowered)."""

from __future__ import annotations

import resource

import pytest
import structlog

from bridge.config import BridgeSettings
from bridge.ops.descriptors import descriptors_needed, raise_descriptor_limit


def test_every_connection_limit_counts() -> None:
    base = descriptors_needed(BridgeSettings())
    assert descriptors_needed(BridgeSettings(pop3={"max_connections": 11000})) == base + 11000 - 1000
    assert descriptors_needed(BridgeSettings(pool={"max_connections": 1100})) == base + 100
    assert descriptors_needed(BridgeSettings(cache={"max_messages": 257})) == base + 2


def test_the_soft_limit_is_raised_to_the_hard_one_and_a_shortfall_is_said() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.fail(f"this test needs a hard descriptor limit of at least 4096 (it is {hard})")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        with structlog.testing.capture_logs() as logs:
            now = raise_descriptor_limit(BridgeSettings())
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 1024
        assert [entry["event"] for entry in logs] == ["descriptor_limit"]
        beyond = (hard if hard != resource.RLIM_INFINITY else 1 << 20) + 1
        with structlog.testing.capture_logs() as logs:
            raise_descriptor_limit(BridgeSettings(pop3={"max_connections": beyond}))
        assert [entry["event"] for entry in logs] == ["descriptor_limit_low"]
        assert "pop3.max_connections" in logs[0]["keys"]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
