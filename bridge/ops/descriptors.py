"""Open-file descriptors: how many the settings may need, and the soft limit raised to meet it.

Every POP3 client, every upstream connection, every cached message and every admin connection
is a descriptor. Many systems start a process with a soft limit of 1,024, far below what a
front end with thousands of devices needs, while allowing much more (the hard limit). At start
the bridge raises its soft limit up to the hard one, and says so when even that is short of
what the settings may need (`descriptor_limit_low`, naming the keys to lower or the limit to
raise: `LimitNOFILE` in systemd, `ulimit -n`, the container runtime's `--ulimit nofile`).
"""

from __future__ import annotations

import resource

from bridge.config import BridgeSettings
from bridge.ops.logs import get_logger

_log = get_logger()
# Listeners, the admin listener, log files, epoll, signal pipes, worker sockets, imports.
_SLACK = 64


def descriptors_needed(settings: BridgeSettings) -> int:
    """The most descriptors the settings allow the process to hold at once."""
    return (
        settings.pop3.max_connections
        + settings.pool.max_connections
        + 2 * settings.cache.max_messages  # kept, and as many being written
        + settings.admin.max_connections
        + _SLACK
    )


def raise_descriptor_limit(settings: BridgeSettings) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows (never lower it); returns
    the soft limit now in force."""
    needed = descriptors_needed(settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            _log.warning("descriptor_limit_not_raised", soft=soft, hard=hard, error=str(exc))
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warning(
            "descriptor_limit_low", limit=soft, needed=needed,
            keys="pop3.max_connections, pool.max_connections, cache.max_messages, admin.max_connections",
        )
    else:
        _log.info("descriptor_limit", limit=soft, needed=needed)
    return soft
