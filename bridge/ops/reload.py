"""Configuration at run time: what a SIGHUP reload may change live.

A reload re-reads `bridge.toml` and the environment. Keys that only take effect when a socket
is opened or a process started (any `listen` key, `server.workers`) keep their running value
and are reported as needing a restart; everything else applies to sessions that start after
the reload (sessions in progress finish with the settings they started with).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.config import BridgeSettings, ConfigError
from bridge.ops.logs import configure_logging, get_logger

_log = get_logger()

# Called after a reload with the settings now in force, e.g. to re-read TLS certificates and
# keys (they are read when a listener's TLS context is built, so a reload must rebuild it).
ReloadHook = Callable[[BridgeSettings], Awaitable[None]]

# Keys bound to a socket or a process count; a reload cannot change them in place.
# upstream.engine: the engine's runtime (trio-asyncio's loop for aioimaplib) is opened at start
# for the configured engine only.
# admin.api: the admin listener is built with or without the API when it starts.
RESTART_ONLY_KEYS = frozenset({"server.workers", "upstream.engine", "admin.api"})


def needs_restart(dotted_key: str) -> bool:
    key = dotted_key.rsplit(".", 1)[-1]
    return key == "listen" or key.endswith("_listen") or dotted_key in RESTART_ONLY_KEYS


def flatten(settings: BridgeSettings) -> dict[str, Any]:
    """`section.key` -> value (tables such as delete.accounts stay one value, and so does the
    list of [[routes]], as `routes`)."""
    flat: dict[str, Any] = {}
    for section, values in settings.model_dump().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def engines_in_use(settings: BridgeSettings) -> set[str]:
    """The engines [upstream] and the routes use: their runtimes are opened at start."""
    default = settings.upstream.engine
    return {default} | {route.engine or default for route in settings.routes}


def changed_keys(old: BridgeSettings, new: BridgeSettings) -> list[str]:
    before, after = flatten(old), flatten(new)
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


@dataclass(frozen=True)
class ReloadPlan:
    settings: BridgeSettings  # the new settings, restart-only keys kept at their running value
    applied: list[str]
    needs_restart: list[str]


def plan_reload(running: BridgeSettings, loaded: BridgeSettings) -> ReloadPlan:
    changed = changed_keys(running, loaded)
    restart = [key for key in changed if needs_restart(key)]
    settings = loaded
    for dotted in restart:
        section, key = dotted.split(".", 1)
        running_section = getattr(running, section)
        settings = settings.model_copy(
            update={section: getattr(settings, section).model_copy(update={key: getattr(running_section, key)})}
        )
    if engines_in_use(settings) - engines_in_use(running):
        # A route on an engine whose runtime is not running: the routes stay as they run.
        restart.append("routes")
        settings = settings.model_copy(update={"routes": running.routes})
    return ReloadPlan(settings, [key for key in changed if key not in restart], restart)


class Reloadable(Protocol):
    settings: BridgeSettings
    reload_hooks: list[ReloadHook]

    def use_settings(self, settings: BridgeSettings) -> None: ...


async def reload_settings(target: Reloadable, load: Callable[[], BridgeSettings] | None) -> ReloadPlan | None:
    """SIGHUP: load the configuration again, apply what can change live, run the reload hooks.

    Logs `config_reloaded` (changed keys, never values: they may be secret) and, for keys
    that need a restart, `config_reload_needs_restart`. A configuration that no longer
    validates is reported as `config_reload_failed` and the running one stays in force."""
    running = target.settings
    try:
        loaded = load() if load is not None else running
    except ConfigError as exc:
        _log.error("config_reload_failed", error=str(exc))
        return None
    plan = plan_reload(running, loaded)
    target.use_settings(plan.settings)
    if running.logging != plan.settings.logging:
        configure_logging(plan.settings.logging.level, plan.settings.logging.format)
    for hook in list(target.reload_hooks):
        try:
            await hook(plan.settings)
        except Exception as exc:  # one failing hook must not stop the others or the service
            _log.error("config_reload_hook_failed", hook=getattr(hook, "__qualname__", repr(hook)), error=type(exc).__name__)
    _log.info("config_reloaded", changed=plan.applied)
    if plan.needs_restart:
        _log.warning("config_reload_needs_restart", keys=plan.needs_restart)
    return plan
