"""Routing without servers: the [[routes]] and [routing] settings, the route table, the lookup
protocol's request and answer (nginx auth_http), which parked connections stay current, the
admin API's configuration and requests, and reloads that change routes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bridge.config import ConfigError, UpstreamSettings, load_settings
from bridge.config.routing import RouteSettings, upstream_login
from bridge.ops.admin_api import AdminApi
from bridge.ops.helpdesk import AdminError
from bridge.ops.reload import plan_reload
from bridge.routing.lookup import (
    MAX_WAIT_SECONDS,
    LookupAnswer,
    LookupRefused,
    LookupRequest,
    LookupUnavailable,
    parse_answer,
    request_headers,
)
from bridge.routing.router import Router
from bridge.routing.routes import Backend, RouteTable
from bridge.session.registry import SessionRecord, SessionRegistry


def settings(**sections: Any) -> Any:
    return load_settings(None, sections)


def test_every_upstream_key_can_be_set_per_route() -> None:
    assert set(UpstreamSettings.model_fields) <= set(RouteSettings.model_fields)
    route = settings(routes=[{"match": "*", "port": 993, "ignore_capabilities": ["MOVE"]}]).routes[0]
    assert route.upstream_overrides() == {"port": 993, "ignore_capabilities": ["MOVE"]}


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"match": "*", "port": 0}, "routes[0].port: Input should be greater than or equal to 1"),
        ({"name": "x", "match": "*", "tls": "ssl"}, "routes[0] (x).tls: Input should be 'none', 'starttls' or 'implicit'"),
        ({"match": "*", "login": "{user}@x"}, "routes[0].login: unknown placeholder {user}"),
        ({"match": "*", "login": "{local!r}"}, "routes[0].login: unknown placeholder {local}"),
        ({"match": []}, "routes[0].match: needs at least one non-empty glob"),
        ({"name": "default", "match": "*"}, 'routes[0] (default).name: "default" is the name of [upstream] itself'),
        ({"name": "a b", "match": "*"}, "routes[0] (a b).name: must be 1-64 letters"),
        ({"match": "*", "ca_file": "/nonexistent"}, "routes[0].ca_file: '/nonexistent' is not a readable file"),
        ({"match": "*", "mailbox": "POP Downloaded"}, "routes[0].mailbox: delete.folder: must not be the maildrop folder"),
        ({"match": "*", "admin_login": "master"}, "routes[0].admin_login: admin_login and admin_password_file must be given together"),
        ({"match": "*", "hostname": "x"}, "routes[0].hostname: unknown key"),
    ],
)
def test_route_errors_name_the_route_and_the_key(route: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(routes=[route])
    assert message in str(caught.value)


def test_route_names_are_unique() -> None:
    with pytest.raises(ConfigError, match=r"routes\[1\] \(route1\)\.name: 'route1' is already the name of routes\[0\]"):
        settings(routes=[{"match": "a*"}, {"name": "route1", "match": "b*"}])


def test_first_match_wins_on_the_account_case_insensitively() -> None:
    table = RouteTable(settings(
        upstream={"host": "imap.example.net"},
        routes=[
            {"name": "legacy", "match": ["*@legacy.example.net", "*@old.example.net"], "host": "imap-old", "port": 993,
             "tls": "implicit", "login": "{local}"},
            {"name": "everyone-else-at-legacy", "match": "*legacy*", "host": "never"},
            {"name": "fixed", "match": "shared@example.com", "login": "frontdesk"},
        ],
    ))
    legacy = table.backend_for("Alice@Legacy.Example.NET")
    assert (legacy.name, legacy.login, legacy.upstream.host, legacy.upstream.port, legacy.upstream.tls) == (
        "legacy", "Alice", "imap-old", 993, "implicit",
    )
    # Keys a route leaves out come from [upstream].
    assert legacy.upstream.mailbox == "INBOX" and legacy.upstream.timeout_seconds == 30
    assert table.backend_for("bob@old.example.net").name == "legacy"
    assert table.backend_for("carol@legacy.example.org").name == "everyone-else-at-legacy"
    assert table.backend_for("shared@example.com").login == "frontdesk"
    default = table.backend_for("dave@example.com")
    assert (default.name, default.login, default.upstream.host) == ("default", "dave@example.com", "imap.example.net")
    assert [route.name for route in table.configured()] == ["legacy", "everyone-else-at-legacy", "fixed", "default"]


def test_a_catch_all_route_leaves_upstream_nothing_to_serve() -> None:
    table = RouteTable(settings(routes=[{"name": "a", "match": "*@a.example"}, {"name": "all", "match": ["x", "*"]}]))
    assert [route.name for route in table.configured()] == ["a", "all"]


@pytest.mark.parametrize(
    ("form", "account", "login"),
    [
        ("{account}", "Alice@Example.com", "Alice@Example.com"),
        ("{local}", "alice@example.com", "alice"),
        ("{domain}", "alice@example.com", "example.com"),
        ("{local}@new.example.org", "alice@example.com", "alice@new.example.org"),
        ("{local}", "alice", "alice"),
        ("{local}", "a@b@example.com", "a@b"),
        ("mailbox-{{archive}}", "x@y", "mailbox-{archive}"),
    ],
)
def test_login_forms(form: str, account: str, login: str) -> None:
    assert upstream_login(form, account) == login


@pytest.mark.parametrize(
    ("admin", "error"),
    [
        ({"listen": "0.0.0.0:9110", "api": True}, "admin.api: on a listener other machines can reach"),
        ({"listen": "127.0.0.1:9110", "api": True, "token": "t", "token_file": "/etc/hostname"}, "give admin.token or admin.token_file"),
    ],
)
def test_admin_api_configuration_errors(admin: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.").replace("(", r"\(")):
        settings(admin=admin)


def test_admin_api_configurations_that_start(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings(admin={"listen": "127.0.0.1:9110", "api": True}).admin.api_token == ""
    monkeypatch.setenv("BRIDGE_ADMIN__TOKEN", " from the environment\n")
    loaded = settings(admin={"listen": "0.0.0.0:9110", "api": True})
    assert loaded.admin.api_token == "from the environment"


def test_routing_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"routing\.lookup_url: must be an http:// or https:// URL"):
        settings(routing={"lookup_url": "ftp://directory"})
    with pytest.raises(ConfigError, match=r"routing\.auth_header: must be an HTTP header name"):
        settings(routing={"auth_header": "X Bad"})
    loaded = settings(routing={"lookup_url": "http://directory.internal/pop3-route", "send_password": True})
    assert loaded.routing.send_password is True


def test_check_config_prints_routes_that_read_back(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from bridge.cli import main

    path = tmp_path / "bridge.toml"
    path.write_text(
        '[routing]\nsend_password = true\nsecret = "the directory secret"\n'
        '[[routes]]\nname = "legacy"\nmatch = ["*@a", "*@b"]\nport = 993\nlogin = "{local}"\n'
    )
    assert main(["check-config", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "[[routes]]" in printed and "the directory secret" not in printed
    assert "send_password = true" in printed
    reread = tmp_path / "reread.toml"
    reread.write_text(printed.replace('"********"', '"the directory secret"'))
    assert load_settings(reread) == load_settings(path)


# -- the lookup protocol ----------------------------------------------------------------------


def test_request_headers_are_nginx_s() -> None:
    routing = settings(routing={"lookup_url": "http://d/", "secret": "s3cret"}).routing
    request = LookupRequest(
        "alice smith%@example.com", "pass word", 2, "192.0.2.7", True, ("192.0.2.7", 40000), ("198.51.100.1", 995),
    )
    headers = request_headers(request, routing)
    assert headers == {
        "Auth-Method": "plain", "Auth-User": "alice%20smith%25@example.com", "Auth-Protocol": "pop3",
        "Auth-Login-Attempt": "2", "Client-IP": "192.0.2.7", "Auth-SSL": "on",
        "Proxy-Protocol-Addr": "192.0.2.7", "Proxy-Protocol-Port": "40000",
        "Proxy-Protocol-Server-Addr": "198.51.100.1", "Proxy-Protocol-Server-Port": "995",
        "X-Auth-Key": "s3cret",
    }
    with_password = settings(routing={"lookup_url": "http://d/", "send_password": True}).routing
    assert request_headers(request, with_password)["Auth-Pass"] == "pass%20word"
    # Non-ASCII is escaped too (UTF-8), so every header is ASCII.
    assert request_headers(LookupRequest("jörg@example.com"), routing)["Auth-User"] == "j%C3%B6rg@example.com"


def answer(status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers={name.replace("_", "-"): value for name, value in headers.items()})


def test_an_ok_answer_with_the_extensions() -> None:
    parsed = parse_answer(answer(Auth_Status="OK", Auth_Server="10.1.2.3", Auth_Port="993", Auth_TLS="Implicit",
                                 Auth_User="alice", Auth_Mailbox="Posteingang%20%C3%9Cbersicht"))
    assert parsed == LookupAnswer("10.1.2.3", 993, "implicit", "alice", "Posteingang Übersicht")
    assert parse_answer(answer(Auth_Status="OK", Auth_Server="[2001:db8::1]", Auth_Port="143")) == LookupAnswer("2001:db8::1", 143)


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (answer(500), "HTTP 500"),
        (answer(), "without Auth-Status"),
        (answer(Auth_Status="OK", Auth_Port="143"), "valid Auth-Server"),
        (answer(Auth_Status="OK", Auth_Server="bad host!", Auth_Port="143"), "valid Auth-Server"),
        (answer(Auth_Status="OK", Auth_Server="imap", Auth_Port="70000"), "valid Auth-Port"),
        (answer(Auth_Status="OK", Auth_Server="imap", Auth_Port="143", Auth_TLS="ssl"), "Auth-TLS"),
        (answer(Auth_Status="OK", Auth_Server="imap", Auth_Port="143", Auth_User=" "), "Auth-User"),
        (answer(Auth_Status="OK", Auth_Server="imap", Auth_Port="143", Auth_Mailbox="a%0Ab"), "Auth-Mailbox"),
    ],
)
def test_unusable_answers_are_unavailable(response: httpx.Response, reason: str) -> None:
    with pytest.raises(LookupUnavailable, match=reason):
        parse_answer(response)


def test_a_refusal_carries_its_text_and_a_bounded_wait() -> None:
    with pytest.raises(LookupRefused) as caught:
        parse_answer(answer(Auth_Status="Invalid login or password", Auth_Wait="3"))
    assert (caught.value.text, caught.value.wait) == ("Invalid login or password", 3.0)
    with pytest.raises(LookupRefused) as caught:
        parse_answer(answer(Auth_Status="x" * 500, Auth_Wait="86400"))
    assert (len(caught.value.text), caught.value.wait) == (200, MAX_WAIT_SECONDS)
    with pytest.raises(LookupRefused) as caught:
        parse_answer(answer(Auth_Status="\t", Auth_Wait="soon"))
    assert (caught.value.text, caught.value.wait) == ("login refused", 0.0)


# -- parked connections after a reload ------------------------------------------------------------


def test_which_connections_stay_current_after_a_reload() -> None:
    routes = [{"name": "a", "match": "a*", "port": 1143}, {"name": "b", "match": "b*", "port": 2143}]
    state = {"settings": settings(routes=routes)}
    router = Router(lambda: state["settings"])
    a, b = router.table().backend_for("alice"), router.table().backend_for("bob")
    moved = Backend("10.0.0.9:993", a.upstream.model_copy(update={"host": "10.0.0.9", "port": 993}), "alice", "a", a.form, True)
    assert all(router.is_current(backend) for backend in (a, b, moved))

    state["settings"] = settings(routes=[dict(routes[0], timeout_seconds=9), routes[1]])
    assert not router.is_current(a) and router.is_current(b) and not router.is_current(moved)

    state["settings"] = settings(routes=[dict(routes[0], login="{local}"), routes[1]])
    assert not router.is_current(a) and router.is_current(b)

    state["settings"] = settings(routes=[routes[1]])  # route a removed
    assert not router.is_current(a) and router.is_current(b)


def test_a_reload_needing_another_engine_keeps_the_running_routes() -> None:
    running = settings(routes=[{"name": "a", "match": "a*"}])
    loaded = settings(routes=[{"name": "a", "match": "a*", "engine": "aioimaplib"}])
    plan = plan_reload(running, loaded)
    assert plan.needs_restart == ["routes"] and plan.settings.routes == running.routes
    same_engines = settings(routes=[{"name": "a", "match": "b*"}])
    assert plan_reload(running, same_engines).applied == ["routes"]


# -- the session registry and the admin API ---------------------------------------------------------


def test_the_registry_matches_accounts_and_kick_leaves_a_quit_to_finish() -> None:
    registry = SessionRegistry()
    ended: list[str] = []
    records = []
    for session, account, device, state in [
        ("s1", "Alice@Example.com", "phone", "transaction"), ("s2", "alice@example.com", "tablet", "update"),
        ("s3", "bob@example.com", "phone", "transaction"), ("s4", None, None, "authorization"),
    ]:
        record = SessionRecord(session, "127.0.0.1:1", False, account=account, device=device, state=state,
                               end=lambda session=session: ended.append(session))
        registry.register(record)
        records.append(record)
    assert [r.session for r in registry.matching("ALICE@*")] == ["s1", "s2"]
    assert len(registry.matching()) == 4
    assert [r.session for r in registry.kick("alice@EXAMPLE.com")] == ["s1", "s2"]
    assert ended == ["s1"]  # s2 is in its QUIT: it ends by itself
    assert [r.session for r in registry.kick("alice@example.com", "phone")] == ["s1"]
    assert ended == ["s1"]  # kicked once
    registry.unregister(records[0])
    assert len(registry) == 3


class _Helpdesk:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def sessions(self, account_glob: str | None) -> list[dict[str, Any]]:
        self.calls.append(("sessions", account_glob))
        return []

    async def kick(self, account: str, device: str | None) -> dict[str, Any]:
        self.calls.append(("kick", account, device))
        return {"kicked": 0, "sessions": []}

    async def devices(self, account: str) -> dict[str, Any]:
        raise AdminError(409, "no admin login")

    async def device_reset(self, account: str, device: str, from_now_on: bool) -> dict[str, Any]:
        self.calls.append(("device_reset", account, device, from_now_on))
        return {}


async def test_the_admin_api_checks_the_token_and_the_parameters() -> None:
    helpdesk = _Helpdesk()
    api = AdminApi(helpdesk, lambda: "the token")
    auth = [(b"authorization", b"Bearer the token")]

    async def status(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] = auth) -> int:
        return (await api.handle(method, target, headers, "127.0.0.1:1"))[0]

    assert await status(b"GET", b"/admin/sessions", []) == 401
    assert await status(b"GET", b"/admin/sessions", [(b"authorization", b"Bearer the token ")]) == 200
    assert await status(b"GET", b"/admin/sessions", [(b"authorization", b"Basic dGhlIHRva2Vu")]) == 401
    assert await status(b"GET", b"/admin/sessions?account=*%40example.com") == 200
    assert await status(b"POST", b"/admin/kick?account=a&device=phone") == 200
    assert await status(b"POST", b"/admin/device-reset?account=a&device=tablet&from_now_on=1") == 200
    assert helpdesk.calls == [
        ("sessions", None), ("sessions", "*@example.com"), ("kick", "a", "phone"), ("device_reset", "a", "tablet", True),
    ]
    assert await status(b"GET", b"/admin/devices?account=a") == 409
    assert await status(b"POST", b"/admin/kick?account=a&account=b") == 400
    assert await status(b"POST", b"/admin/kick?account=%0A") == 400
    assert await status(b"POST", b"/admin/device-reset?account=a") == 400
    assert await status(b"GET", b"/admin/nothing") == 404
    assert await status(b"GET", b"/admin/kick?account=a") == 405
    unconfigured = AdminApi(helpdesk, lambda: "")
    assert (await unconfigured.handle(b"GET", b"/admin/sessions", auth, "x"))[0] == 403


def test_weakened_routes_are_warned_about_by_name() -> None:
    from bridge.config import weakened_settings

    loaded = settings(routes=[
        {"name": "far", "match": "a*", "host": "imap.example.net", "tls": "none"},
        {"name": "near", "match": "b*", "host": "127.0.0.1", "tls": "none"},
        {"name": "trusting", "match": "c*", "host": "imap.example.net", "verify": False},
    ])
    assert [(event, fields.get("backend")) for event, fields in weakened_settings(loaded)] == [
        ("upstream_tls_disabled", "far"), ("upstream_tls_unverified", "trusting"),
    ]
