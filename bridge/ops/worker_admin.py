"""The admin API with `server.workers > 1`: sessions live in the workers, the admin listener
in the supervisor.

Each worker serves the admin API on a Unix socket of its own in the supervisor's private
directory (mode 0700, so only the bridge's user reaches it; no token needed there). The
supervisor's `WorkersHelpdesk` asks every worker: `who` merges their sessions (each marked
with its worker), `kick` kicks in all of them, `devices` is answered by one worker, and
`device-reset` kicks the device's sessions in all workers before one worker resets it.
A worker that is restarting is left out of `who` and `kick` (its sessions ended with it).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import httpx
import trio

from bridge.ops.helpdesk import AdminError, check_device

_TIMEOUT_SECONDS = 120.0


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"admin-{index}.sock")


async def open_unix_listener(path: str) -> trio.SocketListener:
    """A listening Unix socket at `path` (a stale one from a crashed worker is replaced)."""
    await trio.Path(path).unlink(missing_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(64)
    return trio.SocketListener(sock)


class WorkersHelpdesk:
    def __init__(self, paths: list[str]) -> None:
        self._paths = paths

    async def _ask(self, path: str, method: str, action: str, params: dict[str, str]) -> Any:
        transport = httpx.AsyncHTTPTransport(uds=path)
        try:
            async with httpx.AsyncClient(transport=transport, timeout=_TIMEOUT_SECONDS, trust_env=False) as client:
                response = await client.request(method, f"http://worker/admin/{action}", params=params)
        except httpx.HTTPError:
            return None  # the worker is restarting
        body = response.json()
        if response.status_code != 200:
            raise AdminError(response.status_code, body.get("error", "the worker refused"))
        return body

    async def _everyone(self, method: str, action: str, params: dict[str, str]) -> list[tuple[int, Any]]:
        answers: list[tuple[int, Any]] = []

        async def ask(index: int, path: str) -> None:
            body = await self._ask(path, method, action, params)
            if body is not None:
                answers.append((index, body))

        async with trio.open_nursery() as nursery:
            for index, path in enumerate(self._paths):
                nursery.start_soon(ask, index, path)
        return sorted(answers, key=lambda answer: answer[0])

    async def _anyone(self, method: str, action: str, params: dict[str, str]) -> Any:
        for path in self._paths:
            body = await self._ask(path, method, action, params)
            if body is not None:
                return body
        raise AdminError(503, "no worker is running")

    async def sessions(self, account_glob: str | None) -> list[dict[str, Any]]:
        params = {"account": account_glob} if account_glob is not None else {}
        merged = [
            {**session, "worker": index}
            for index, body in await self._everyone("GET", "sessions", params)
            for session in body["sessions"]
        ]
        return sorted(merged, key=lambda session: session["since"])

    async def kick(self, account: str, device: str | None) -> dict[str, Any]:
        if device is not None:
            check_device(device)
        params = {"account": account, **({"device": device} if device is not None else {})}
        answers = await self._everyone("POST", "kick", params)
        sessions = [{**session, "worker": index} for index, body in answers for session in body["sessions"]]
        return {"kicked": len(sessions), "sessions": sessions}

    async def devices(self, account: str) -> dict[str, Any]:
        return await self._anyone("GET", "devices", {"account": account})  # type: ignore[no-any-return]

    async def device_reset(self, account: str, device: str, from_now_on: bool) -> dict[str, Any]:
        await self.kick(account, device)
        params = {"account": account, "device": device, **({"from_now_on": "1"} if from_now_on else {})}
        return await self._anyone("POST", "device-reset", params)  # type: ignore[no-any-return]
