"""What the admin API does (bridge.ops.admin_api): live sessions, kicking them, and the devices
recorded in an account's state folder.

`LocalHelpdesk` acts on this process: its session registry (bridge.session.registry) and,
for the devices, a connection to the account's back end opened as that back end's
administrator (`upstream.admin_login`: a Dovecot master user or a Cyrus admin, SASL PLAIN
authorized as the account), since the helpdesk has no customer's password. The supervisor of
`server.workers > 1` asks every worker instead (bridge.ops.worker_admin).

`device_reset` rewrites a device's state record, signed like every record
(bridge.policy.device_state): the device sees everything again, or with `from_now_on` only
mail that arrives from now on (every message there now is hidden from it). The device's
sessions are kicked first: one of them saving its state at QUIT would otherwise merge the
old record back.
"""

from __future__ import annotations

from typing import Any, Protocol

from bridge.config import BridgeSettings, is_device_name
from bridge.imap.engines import open_admin_mailbox
from bridge.imap.errors import AuthenticationFailed, UpstreamError
from bridge.imap.mailbox import ImapMailbox
from bridge.ops.logs import get_logger
from bridge.policy.device_state import DeviceStateStore, StateSigner
from bridge.policy.uid_ranges import UidRanges
from bridge.routing.lookup import LookupRefused, LookupRequest, LookupUnavailable
from bridge.routing.routes import Backend
from bridge.session.services import SharedServices

_log = get_logger(component="admin")


class AdminError(Exception):
    """A request the API refuses: HTTP `status` and the reason (safe to show)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class Helpdesk(Protocol):
    async def sessions(self, account_glob: str | None) -> list[dict[str, Any]]: ...
    async def kick(self, account: str, device: str | None) -> dict[str, Any]: ...
    async def devices(self, account: str) -> dict[str, Any]: ...
    async def device_reset(self, account: str, device: str, from_now_on: bool) -> dict[str, Any]: ...


def policy_of(settings: BridgeSettings, account: str) -> str:
    overrides = settings.delete.account_settings(account)
    return (overrides.policy if overrides else None) or settings.delete.policy


def check_device(device: str) -> None:
    if not is_device_name(device):
        raise AdminError(400, "device names are 1-64 letters, digits, '.', '_' or '-'")


class LocalHelpdesk:
    def __init__(self, services: SharedServices) -> None:
        self._services = services

    async def sessions(self, account_glob: str | None) -> list[dict[str, Any]]:
        return [record.as_dict() for record in self._services.sessions.matching(account_glob)]

    async def kick(self, account: str, device: str | None) -> dict[str, Any]:
        if device is not None:
            check_device(device)
        kicked = self._services.sessions.kick(account, device)
        if kicked:
            _log.info("sessions_kicked", account=account, device=device, sessions=[r.session for r in kicked])
        return {"kicked": len(kicked), "sessions": [record.as_dict() for record in kicked]}

    async def _backend(self, account: str) -> Backend:
        try:
            return await self._services.router.route(LookupRequest(account, method="none"))
        except LookupRefused as exc:
            raise AdminError(409, f"the lookup service refused the account: {exc.text}") from None
        except LookupUnavailable as exc:
            raise AdminError(503, str(exc)) from None

    async def _open(self, backend: Backend) -> ImapMailbox:
        if not backend.upstream.admin_login:
            raise AdminError(
                409, f"back end {backend.name} has no admin login (upstream.admin_login and admin_password_file)"
            )
        try:
            return await open_admin_mailbox(backend.upstream, backend.login)
        except AuthenticationFailed:
            raise AdminError(502, f"back end {backend.name} refused the admin login for this account") from None
        except UpstreamError as exc:
            raise AdminError(502, f"back end {backend.name}: {exc}") from None

    def _store(self, mailbox: ImapMailbox, account: str, backend: Backend) -> DeviceStateStore:
        delete = self._services.settings.delete
        signer = StateSigner(delete.signing_key, account, accept_unsigned=delete.accept_unsigned_state)
        return DeviceStateStore(mailbox, delete.state_folder, backend.upstream.mailbox, signer)

    async def devices(self, account: str) -> dict[str, Any]:
        settings = self._services.settings
        policy = policy_of(settings, account)
        answer: dict[str, Any] = {"account": account, "policy": policy, "devices": []}
        if policy != "per-client":
            answer["note"] = "devices are recorded only under the per-client delete policy"
            return answer
        backend = await self._backend(account)
        mailbox = await self._open(backend)
        try:
            snapshot = await mailbox.snapshot()
            states = await self._store(mailbox, account, backend).load_all(snapshot.uidvalidity)
        except UpstreamError as exc:
            raise AdminError(502, f"back end {backend.name}: {exc}") from None
        finally:
            await mailbox.aclose()
        answer.update(backend=backend.name, messages=len(snapshot.uids))
        answer["devices"] = [
            {
                "device": state.device,
                "last_seen": state.last_seen.isoformat(timespec="seconds") if state.last_seen else None,
                "hidden": sum(1 for uid in snapshot.uids if state.hides(uid)),
                "records": len(state.versions),
            }
            for state in sorted(states.values(), key=lambda state: state.device)
        ]
        return answer

    async def device_reset(self, account: str, device: str, from_now_on: bool) -> dict[str, Any]:
        check_device(device)
        settings = self._services.settings
        policy = policy_of(settings, account)
        if policy != "per-client":
            raise AdminError(409, f"the account's delete policy is {policy}; devices have state only under per-client")
        backend = await self._backend(account)
        await self.kick(account, device)
        mailbox = await self._open(backend)
        try:
            snapshot = await mailbox.snapshot()
            store = self._store(mailbox, account, backend)
            state = await store.load(device, snapshot.uidvalidity)
            state.hidden = UidRanges.of(snapshot.uids) if from_now_on else UidRanges()
            state.hidden_unsigned = UidRanges()
            await store.save(state, snapshot.uidvalidity)
        except UpstreamError as exc:
            raise AdminError(502, f"back end {backend.name}: {exc}") from None
        finally:
            await mailbox.aclose()
        hidden = len(snapshot.uids) if from_now_on else 0
        _log.info("device_reset", account=account, device=device, from_now_on=from_now_on, hidden=hidden)
        return {
            "account": account, "device": device, "backend": backend.name, "from_now_on": from_now_on,
            "messages": len(snapshot.uids), "hidden": hidden,
        }
