"""The listening sockets a supervisor binds once and its workers inherit
(bridge.net.sockets): what a worker's command line carries, and that a worker's listener on
an inherited descriptor accepts the connections made to the address the supervisor bound."""

from __future__ import annotations

import os
import socket

import pytest

from bridge.config import load_settings
from bridge.net.listeners import ListenerKind
from bridge.net.sockets import (
    InheritedListener,
    ListenError,
    bind_pop3_sockets,
    open_pop3_listeners,
)
from tests.security_support import TlsFiles


@pytest.mark.parametrize(
    "listener",
    [
        InheritedListener(7, ListenerKind("0.0.0.0:110")),
        InheritedListener(12, ListenerKind("[::1]:995", tls=True)),
        InheritedListener(3, ListenerKind("pop.example.net:1110")),
    ],
)
def test_a_listener_reads_back_from_its_argument(listener: InheritedListener) -> None:
    assert InheritedListener.parse(listener.as_argument()) == listener


def test_an_argument_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="expected FD:tls|plain:ADDRESS"):
        InheritedListener.parse("7:ssl:0.0.0.0:995")


async def test_a_worker_accepts_on_the_sockets_its_supervisor_bound(tls_files: TlsFiles) -> None:
    settings = load_settings(None, {"pop3": {
        "listen": ["127.0.0.1:0"], "tls_listen": ["127.0.0.1:0"], "tls_cert": tls_files.cert, "tls_key": tls_files.key,
    }})
    bound = bind_pop3_sockets(settings)
    # A worker's descriptors are other numbers for the same sockets, as after exec.
    copies = [InheritedListener(os.dup(sock.fileno()), kind) for sock, kind in bound]
    try:
        assert [kind for _sock, kind in bound] == [ListenerKind("127.0.0.1:0"), ListenerKind("127.0.0.1:0", tls=True)]
        opened = await open_pop3_listeners(settings, copies)
        assert [kind for _listener, kind in opened] == [kind for _sock, kind in bound]
        for (listener, _kind), (sock, _same) in zip(opened, bound, strict=True):
            address = sock.getsockname()
            assert address[1] != 0
            with socket.create_connection(address, timeout=5) as client:
                accepted = await listener.accept()
                await accepted.send_all(b"+OK\r\n")
                assert client.recv(5) == b"+OK\r\n"
                await accepted.aclose()
            await listener.aclose()
    finally:
        for sock, _kind in bound:
            sock.close()
        for copy in copies:
            try:
                os.close(copy.fd)
            except OSError:
                pass  # closed with its listener


def test_an_address_in_use_is_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = load_settings(None, {"pop3": {"listen": [f"127.0.0.1:{port}"]}})
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            bind_pop3_sockets(settings)


async def test_a_process_of_its_own_names_the_address_it_cannot_listen_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = load_settings(None, {"pop3": {"listen": ["127.0.0.1:0", f"127.0.0.1:{port}"]}})
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            await open_pop3_listeners(settings)
