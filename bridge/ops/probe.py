"""`pop3-imap-bridge probe`: what an IMAP server offers and what the bridge will make of it.

It connects as the bridge would (the configured engine, TLS mode, CA and verification, through
bridge.imap's engines and ImapMailbox), reads the capabilities, logs in when given an account
and its password, and lists the maildrop; then it says, per extension, whether the bridge
will use it or what it falls back to, and gives a verdict per delete policy and per UIDL
format:

- "yes": served as designed; "fallback": served by a fallback with the same guarantees;
- "degraded": served, but weaker (e.g. `expunge` without UIDPLUS only flags messages
  `\\Deleted`: they vanish from POP3 and stay on the server until someone expunges);
- "no": cannot be served (no connection, TLS or login failed, the maildrop cannot be read);
- "unknown": the capabilities before login do not tell (give --account).

The exit status is 0 when the policy in force (the account's, or `delete.policy`) is "yes",
"fallback" or "unknown", 1 when it is "degraded" or "no", 2 for bad arguments.

Capabilities are upper-cased names; the server's post-login list decides when there is one
(many servers, Dovecot among them, advertise less before login).
"""

from __future__ import annotations

from typing import Any

import trio

from bridge.config import BridgeSettings
from bridge.imap.engines import engine, engine_runtime
from bridge.imap.errors import AuthenticationFailed, UpstreamError
from bridge.imap.mailbox import ImapMailbox
from bridge.routing.lookup import LookupRequest
from bridge.routing.router import Router
from bridge.routing.routes import Backend

POLICIES = ("expunge", "move", "keep", "per-client")
# The UIDL formats this bridge has (bridge.session.uidl).
# [uidl] format: every pop3_uidl_format and preset needs only UID and UIDVALIDITY; "emailid"
# the server's OBJECTID; reuse_x_uidl (X-UIDL headers) a header FETCH, which every server has.
UIDL_FORMATS = ("dovecot", "uw", "cyrus", "custom", "emailid", "x-uidl")
_SERVED = ("yes", "fallback", "unknown")


async def looked_up(settings: BridgeSettings, account: str, password: str | None) -> Backend:
    """The account's back end as a login would get it, the lookup service asked."""
    router = Router(lambda: settings)
    try:
        return await router.route(LookupRequest(account, password))
    finally:
        await router.aclose()


def _features(
    caps: frozenset[str], offered: frozenset[str], before_login: frozenset[str], offered_before_login: frozenset[str],
    engine_name: str, known: bool,
) -> list[dict[str, Any]]:
    """Per extension: "offered", "ignored" (upstream.ignore_capabilities), "absent" or "not
    advertised before login", and what the bridge does with it or without it. `caps`: what
    the bridge goes by; `offered`: what the server advertised; `before_login`: what the
    bridge chose its login by."""
    trio_engine = engine_name == "trio"

    def feature(name: str, usable: bool, used: str, otherwise: str, names: tuple[str, ...] = ()) -> dict[str, Any]:
        if usable:
            return {"name": name, "status": "offered", "bridge": used}
        if set(names or (name,)) & offered:
            status = "ignored"
        else:
            status = "absent" if known else "not advertised before login"
        return {"name": name, "status": status, "bridge": otherwise}

    listing = (
        "QRESYNC: a warm listing refreshed with SELECT (QRESYNC) + CHANGEDSINCE" if "QRESYNC" in caps
        else "CONDSTORE: a warm listing refreshed with CHANGEDSINCE" if "CONDSTORE" in caps
        else "a warm listing refreshed with UID FETCH from the last UID"
    )
    return [
        feature("UIDPLUS", "UIDPLUS" in caps, "UID EXPUNGE removes exactly the deleted messages",
                "deleted messages are only flagged \\Deleted (hidden from POP3, removed at the next expunge)"),
        feature("MOVE", "MOVE" in caps, "UID MOVE for the move policy",
                "UID COPY, then flag (and UID EXPUNGE with UIDPLUS) exactly the moved messages"),
        feature("IDLE", "IDLE" in caps,
                "parked connections IDLE" if trio_engine else "not used by the aioimaplib engine (NOOP keep-alive)",
                "parked connections send NOOP every pool.keepalive_seconds"),
        feature("CONDSTORE/QRESYNC", bool({"CONDSTORE", "QRESYNC"} & caps),
                listing if trio_engine else "not used by the aioimaplib engine (full listing at every login)",
                listing if trio_engine else "full listing at every login", ("CONDSTORE", "QRESYNC")),
        feature("LITERAL+", "LITERAL+" in caps,
                "APPEND (device state records) without waiting for a continuation" if trio_engine else "not used by the aioimaplib engine",
                "APPEND waits for the server's continuation"),
        {
            "name": "SASL-IR",
            "status": "offered" if {"SASL-IR", "AUTH=PLAIN"} <= before_login else (
                "ignored" if {"SASL-IR", "AUTH=PLAIN"} <= offered_before_login else "absent"),
            "bridge": "login with AUTHENTICATE PLAIN in one round trip" if {"SASL-IR", "AUTH=PLAIN"} <= before_login
            else "login with LOGIN (quoted strings)",
        },
        feature("OBJECTID", "OBJECTID" in caps, "not used (UIDLs are made of UID and UIDVALIDITY)",
                "not needed (UIDLs are made of UID and UIDVALIDITY)"),
    ]


def _verdict(verdict: str, how: str) -> dict[str, str]:
    return {"verdict": verdict, "how": how}


def policy_verdicts(caps: frozenset[str], known: bool, usable: bool, why_not: str = "") -> dict[str, dict[str, str]]:
    """A verdict per delete policy. `known`: the capabilities after login; `usable`: the
    bridge can log in and read the maildrop (else every policy is "no")."""
    if not usable:
        return {policy: _verdict("no", why_not) for policy in POLICIES}

    def needs(name: str, yes: str, without: tuple[str, str]) -> dict[str, str]:
        if name in caps:
            return _verdict("yes", yes)
        return _verdict(*without) if known else _verdict("unknown", f"{name} is not advertised before login; give --account")

    expunge = needs("UIDPLUS", "\\Deleted + UID EXPUNGE of exactly the marked messages",
                    ("degraded", "without UIDPLUS the marked messages are only flagged \\Deleted, never expunged by the bridge"))
    if "MOVE" in caps:
        move = _verdict("yes", "UID MOVE")
    elif "UIDPLUS" in caps:
        move = _verdict("fallback", "UID COPY + \\Deleted + UID EXPUNGE of exactly the moved messages")
    elif known:
        move = _verdict("degraded", "UID COPY + \\Deleted: the originals stay flagged until someone expunges")
    else:
        move = _verdict("unknown", "MOVE and UIDPLUS are not advertised before login; give --account")
    per_client = _verdict(
        "yes", "state records in the state folder (APPEND, SEARCH)"
        + ("" if "UIDPLUS" in caps or not known else "; superseded records stay flagged \\Deleted without UIDPLUS"),
    )
    return {"expunge": expunge, "move": move, "keep": _verdict("yes", "\\Seen is set; nothing is deleted"), "per-client": per_client}


def uidl_verdicts(caps: frozenset[str], known: bool, usable: bool, why_not: str = "") -> dict[str, dict[str, str]]:
    """A verdict per `[uidl]` choice. `known`: the capabilities after login."""
    if not usable:
        return {name: _verdict("no", why_not) for name in UIDL_FORMATS}
    uid_only = "UID and UIDVALIDITY, which every IMAP server has"
    if "OBJECTID" in caps:
        emailid = _verdict("yes", "the server's RFC 8474 EMAILID (OBJECTID)")
    elif known:
        emailid = _verdict("no", "the server offers no OBJECTID (RFC 8474): logins would be refused")
    else:
        emailid = _verdict("unknown", "OBJECTID is announced after login: probe with --account")
    return {
        "dovecot": _verdict("yes", "%08Xu%08Xv: " + uid_only),
        "uw": _verdict("yes", "%08Xv%08Xu: " + uid_only),
        "cyrus": _verdict("yes", "%v.%u: " + uid_only),
        "custom": _verdict("yes", "a pop3_uidl_format of %u and %v: " + uid_only),
        "emailid": emailid,
        "x-uidl": _verdict("yes", "reuse_x_uidl: X-UIDL headers read with a header FETCH"),
    }


def _certificate(tls: Any) -> dict[str, Any] | None:
    if tls is None:
        return None
    cert = tls.certificate

    def names(key: str) -> str:
        return ", ".join("=".join(part) for rdn in cert.get(key, ()) for part in rdn)

    return {
        "version": tls.version, "cipher": tls.cipher, "verified": bool(cert),
        "subject": names("subject") or None, "issuer": names("issuer") or None,
        "not_after": cert.get("notAfter"), "names": [value for _kind, value in cert.get("subjectAltName", ())],
    }


async def probe(settings: BridgeSettings, backend: Backend, password: str | None, policy: str) -> dict[str, Any]:
    """The report; `password` None: no login (capabilities before login only)."""
    upstream = backend.upstream
    report: dict[str, Any] = {
        "backend": backend.name, "server": backend.address, "tls_mode": upstream.tls, "engine": upstream.engine,
        "policy": policy, "login": {"user": backend.login if password is not None else None, "result": "not tried"},
        "problems": [],
    }
    async with engine_runtime(upstream.engine):
        await _connect_and_look(report, backend, password)
    ignored = upstream.ignore_capabilities_set
    offered = frozenset(report.get("capabilities", ()))
    caps = offered - ignored
    offered_before_login = frozenset(report.get("capabilities_before_login", ()))
    before_login = offered_before_login - ignored
    known = report["login"]["result"] == "ok"
    usable = not report["problems"]
    why_not = "; ".join(report["problems"])
    report["features"] = _features(caps, offered, before_login, offered_before_login, upstream.engine, known) if offered else []
    report["policies"] = policy_verdicts(caps, known, usable, why_not)
    report["uidl_formats"] = uidl_verdicts(caps, known, usable, why_not)
    report["served"] = report["policies"][policy]["verdict"] in _SERVED
    return report


async def _connect_and_look(report: dict[str, Any], backend: Backend, password: str | None) -> None:
    upstream = backend.upstream
    try:
        with trio.fail_after(upstream.timeout_seconds * 3):
            channel = await engine(upstream.engine).open_channel(upstream)
            mailbox = ImapMailbox(channel, upstream)
            try:
                await _look(report, mailbox, backend, password)
            finally:
                await mailbox.aclose()
    except trio.TooSlowError:
        report["problems"].append(f"no answer within {upstream.timeout_seconds * 3:g} s")
    except UpstreamError as exc:
        report["problems"].append(str(exc) or type(exc).__name__)


async def _look(report: dict[str, Any], mailbox: ImapMailbox, backend: Backend, password: str | None) -> None:
    report["tls"] = _certificate(mailbox.tls_session())
    await mailbox.ask_capabilities()
    report["capabilities_before_login"] = sorted(mailbox.offered_capabilities)
    report["capabilities"] = sorted(mailbox.offered_capabilities)
    report["ignored_capabilities"] = sorted(backend.upstream.ignore_capabilities_set)
    report["login_mechanisms"] = sorted(cap[5:] for cap in mailbox.offered_capabilities if cap.startswith("AUTH="))
    if "LOGINDISABLED" in mailbox.offered_capabilities:
        report["problems"].append("the server refuses logins on this connection (LOGINDISABLED)")
        return
    if password is None:
        return
    try:
        await mailbox.log_in(backend.login, password)
    except AuthenticationFailed:
        report["login"]["result"] = "refused"
        report["problems"].append(f"the server refused the login of {backend.login}")
        return
    report["login"]["result"] = "ok"
    report["capabilities"] = sorted(mailbox.offered_capabilities)
    snapshot = await mailbox.snapshot()
    report["maildrop"] = {"folder": backend.upstream.mailbox, "messages": len(snapshot.uids), "uidvalidity": snapshot.uidvalidity}


def render(report: dict[str, Any]) -> str:
    """The report as a person reads it."""
    lines = [f"back end {report['backend']}: {report['server']} (tls {report['tls_mode']}, engine {report['engine']})"]
    tls = report.get("tls")
    if tls:
        verified = "verified" if tls["verified"] else "NOT verified"
        lines.append(f"  TLS: {tls['version']} {tls['cipher']}; certificate {verified}")
        if tls["verified"]:
            lines.append(f"    subject {tls['subject']}; issuer {tls['issuer']}; expires {tls['not_after']}")
            lines.append(f"    names: {', '.join(tls['names']) or '-'}")
    if "capabilities" in report:
        lines.append(f"  capabilities: {' '.join(report['capabilities'])}")
        if report["ignored_capabilities"]:
            lines.append(f"  ignored (upstream.ignore_capabilities): {' '.join(report['ignored_capabilities'])}")
        lines.append(f"  login mechanisms: {' '.join(report['login_mechanisms']) or '-'}")
    login = report["login"]
    lines.append(f"  login: {login['result']}" + (f" as {login['user']}" if login["user"] else " (no --account given)"))
    if "maildrop" in report:
        drop = report["maildrop"]
        lines.append(f"  maildrop {drop['folder']!r}: {drop['messages']} messages, UIDVALIDITY {drop['uidvalidity']}")
    for problem in report["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    if report["features"]:
        lines.append("extensions:")
        for item in report["features"]:
            lines.append(f"  {item['name']:<18} {item['status']:<28} {item['bridge']}")
    lines.append("delete policies:")
    for policy, verdict in report["policies"].items():
        mark = " (in force)" if policy == report["policy"] else ""
        lines.append(f"  {policy:<11} {verdict['verdict']:<9} {verdict['how']}{mark}")
    lines.append("UIDL formats:")
    for name, verdict in report["uidl_formats"].items():
        lines.append(f"  {name:<16} {verdict['verdict']:<9} {verdict['how']}")
    lines.append(f"verdict: the policy in force ({report['policy']}) {'can' if report['served'] else 'CANNOT'} be served")
    return "\n".join(lines)
