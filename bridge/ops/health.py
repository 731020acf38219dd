"""Is each back end there? What /readyz answers and `bridge_backend_up` says.

Each back end the configuration names (every route, and `[upstream]` as "default" unless a
route matching every account leaves it nothing to serve) is asked for a TCP connect and an
IMAP greeting (`* OK`) within a few seconds, all at once; the answers are reused for
`admin.readiness_cache_seconds`. A `* PREAUTH` greeting is not ready: the engines refuse it
(`bridge.imap.errors.PreauthGreeting`).

The service is ready while at least one back end answers: a back end that is down fails only
its own accounts' logins, and taking the whole bridge out of a load balancer would fail every
other account too. /readyz then lists each back end with its state. Servers a lookup service
names are not known in advance and are watched through their login metrics instead.

`bridge_backend_up{backend}` (1 or 0) is this check's result, refreshed when /metrics is
scraped (through the same cache), so an alert can name the back end that is down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.config import BridgeSettings
from bridge.routing.routes import RouteTable

_PROBE_TIMEOUT_SECONDS = 5.0
_GREETING_LIMIT = 1024


async def probe_server(host: str, port: int, seconds: float) -> tuple[bool, str]:
    """(answers with an IMAP greeting within `seconds`, "ready" or why not) for one server."""
    try:
        with trio.fail_after(seconds):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                greeting = b""
                while b"\r\n" not in greeting and len(greeting) < _GREETING_LIMIT:
                    data = await stream.receive_some(_GREETING_LIMIT)
                    if not data:
                        break
                    greeting += data
    except trio.TooSlowError:
        return False, f"no greeting within {seconds:g} s"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    except trio.BrokenResourceError:
        return False, "connection reset"
    if greeting.upper().startswith(b"* OK"):
        return True, "ready"
    if greeting.upper().startswith(b"* PREAUTH"):
        return False, "PREAUTH greeting (logins are refused)"
    return False, "no IMAP greeting"


class BackendHealth(Collector):
    """The back ends' state, cached; a Prometheus collector of `bridge_backend_up`."""

    def __init__(self, settings: Callable[[], BridgeSettings]) -> None:
        self._settings = settings
        self._lock = trio.Lock()
        self._checked_at: float | None = None
        self._checked_settings: BridgeSettings | None = None
        # name -> (address, answers, reason)
        self._states: dict[str, tuple[str, bool, str]] = {}

    def _fresh(self) -> bool:
        settings = self._settings()
        max_age = settings.admin.readiness_cache_seconds
        return (
            self._checked_at is not None
            and self._checked_settings is settings
            and trio.current_time() - self._checked_at < max_age
        )

    async def refresh(self) -> None:
        if self._fresh():
            return
        async with self._lock:  # concurrent probes share one check
            if not self._fresh():
                settings = self._settings()
                self._states = await self._probe_all(settings)
                self._checked_at, self._checked_settings = trio.current_time(), settings

    @staticmethod
    async def _probe_all(settings: BridgeSettings) -> dict[str, tuple[str, bool, str]]:
        states: dict[str, tuple[str, bool, str]] = {}

        async def probe(name: str, host: str, port: int, seconds: float) -> None:
            ready, reason = await probe_server(host, port, seconds)
            states[name] = (f"{host}:{port}", ready, reason)

        routes = RouteTable(settings).configured()
        async with trio.open_nursery() as nursery:
            for route in routes:
                upstream = route.upstream
                timeout = min(upstream.timeout_seconds, _PROBE_TIMEOUT_SECONDS)
                nursery.start_soon(probe, route.name, upstream.host, upstream.port, timeout)
        return {route.name: states[route.name] for route in routes}

    async def check(self) -> tuple[bool, str]:
        """(ready, the text of /readyz): with one back end, "ready" or "upstream host:port:
        reason"; with several, a first line and one line per back end."""
        await self.refresh()
        states = self._states
        if len(states) == 1:
            ((address, ready, reason),) = states.values()
            return (True, "ready") if ready else (False, f"upstream {address}: {reason}")
        up = [name for name, (_address, ready, _reason) in states.items() if ready]
        first = "ready" if len(up) == len(states) else (
            f"ready: {len(up)} of {len(states)} back ends answer" if up else "no back end answers"
        )
        lines = [first] + [
            f"backend {name} {address}: {reason}" for name, (address, _ready, reason) in states.items()
        ]
        return bool(up), "\n".join(lines)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "bridge_backend_up", "1 if the back end answered the last check with an IMAP greeting, else 0.",
            labels=["backend"],
        )
        for name, (_address, ready, _reason) in self._states.items():
            family.add_metric([name], 1.0 if ready else 0.0)
        yield family
