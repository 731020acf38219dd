"""PROXY protocol v1/v2 parsing: good headers, malformed ones, and never reading past a header."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.net.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    bytes_needed,
    parse_proxy_header,
)


def v2(
    command: int = 1,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, family]) + struct.pack("!H", size) + body


def inet(src: str = "203.0.113.7", dst: str = "192.0.2.1", sport: int = 51234, dport: int = 110) -> bytes:
    return ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)


def inet6(src: str = "2001:db8::7", dst: str = "2001:db8::1", sport: int = 40000, dport: int = 995) -> bytes:
    return ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse_whole(data: bytes) -> tuple[ProxyHeader, int]:
    result = parse_proxy_header(data)
    assert result is not None
    return result


# -- version 1 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "source", "destination"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 110\r\n", ("203.0.113.7", 51234), ("192.0.2.1", 110)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 995\r\n", ("2001:db8::7", 40000), ("2001:db8::1", 995)),
        (b"PROXY TCP6 ::ffff:10.0.0.1 ::1 0 65535\r\n", ("::ffff:a00:1", 0), ("::1", 65535)),
    ],
)
def test_v1_good(line: bytes, source: tuple[str, int], destination: tuple[str, int]) -> None:
    header, length = parse_whole(line + b"USER x\r\n")
    assert (header.version, header.source, header.destination) == (1, source, destination)
    assert length == len(line)
    assert not header.client_tls


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_carries_no_address(line: bytes) -> None:
    header, length = parse_whole(line)
    assert header.source is None and length == len(line)
    assert not header.local  # a relayed client, just without an address


def test_v1_longest_possible_header() -> None:
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LENGTH - 3  # the spec's 107 has room to spare
    header, _ = parse_whole(line)
    assert header.source == (v6, 65535)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 110\n", "CRLF"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234\r\n", "expected"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 110 9\r\n", "expected"),
        (b"PROXY TCP4 203.0.113.7  192.0.2.1 51234 110\r\n", "expected"),
        (b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n", "TCP4 address"),
        (b"PROXY TCP6 203.0.113.7 2001:db8::1 1 2\r\n", "TCP6 address"),
        (b"PROXY TCP4 203.0.113.300 192.0.2.1 1 2\r\n", "TCP4 address"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 110\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 110\r\n", "port"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 +1 110\r\n", "port"),
        (b"PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n", "family"),
        (b"PROXY \r\n", "family"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2\rX\r\n", "invalid character"),
        (b"PROXY TCP4 203.0.113.\xff 192.0.2.1 1 2\r\n", "invalid character"),
        (b"PROXY " + b"A" * 200, "107"),
        (b"proxy TCP4 203.0.113.7 192.0.2.1 1 2\r\n", "not a PROXY"),
        (b"USER alice\r\n", "not a PROXY"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "not a PROXY"),  # a TLS ClientHello
        (b"\r\n\r\n\x00\r\nQUIX\n!!!!", "not a PROXY"),
    ],
)
def test_v1_and_junk_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_junk_is_recognised_from_its_first_byte() -> None:
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(b"U")


def test_v1_incomplete_waits() -> None:
    line = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 110\r\n"
    for cut in range(len(line)):
        assert parse_proxy_header(line[:cut]) is None


# -- version 2 -------------------------------------------------------------------------------


def test_v2_tcp4() -> None:
    data = v2(addresses=inet())
    header, length = parse_whole(data + b"\x16\x03\x01")
    assert header == ProxyHeader(2, ("203.0.113.7", 51234), ("192.0.2.1", 110))
    assert length == len(data)


def test_v2_tcp6() -> None:
    header, _ = parse_whole(v2(family=0x21, addresses=inet6()))
    assert header.source == ("2001:db8::7", 40000) and header.destination == ("2001:db8::1", 995)


def test_v2_local_ignores_addresses_and_tlvs() -> None:
    data = v2(command=0, family=0x11, addresses=inet(), tlvs=b"\x01garbage")
    header, length = parse_whole(data)
    assert header.source is None and length == len(data)
    assert header.local


def test_v2_local_unspec_empty() -> None:
    header, length = parse_whole(v2(command=0, family=0x00))
    assert header.source is None and length == 16
    assert header.local


def test_v2_unspec_and_unix_carry_no_ip() -> None:
    unspec = parse_whole(v2(family=0x00))[0]
    assert unspec.source is None and not unspec.local
    unix = parse_whole(v2(family=0x31, addresses=b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0")))[0]
    assert unix.source is None and not unix.local


def test_v2_tlvs_and_ssl_flag() -> None:
    ssl_tlv = tlv(0x20, bytes([0x07]) + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
    data = v2(addresses=inet(), tlvs=tlv(0x04, b"\0\0") + ssl_tlv + tlv(0x01, b"pop3"))
    header, _ = parse_whole(data)
    assert header.client_tls
    assert [kind for kind, _ in header.tlvs] == [0x04, 0x20, 0x01]


def test_v2_ssl_tlv_without_client_ssl_bit() -> None:
    header, _ = parse_whole(v2(addresses=inet(), tlvs=tlv(0x20, bytes([0x00]) + b"\0\0\0\0")))
    assert not header.client_tls


def test_v2_addresses_may_be_followed_by_padding_free_tlv_space() -> None:
    header, length = parse_whole(v2(addresses=inet(), tlvs=b""))
    assert length == 16 + 12


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (v2(version=1, addresses=inet()), "version"),
        (v2(command=2, addresses=inet()), "command"),
        (v2(family=0x41, addresses=inet()), "family"),
        (v2(family=0x13, addresses=inet()), "family"),
        (v2(family=0x12, addresses=inet()), "TCP"),
        (v2(addresses=inet()[:8]), "too short"),
        (v2(family=0x21, addresses=inet()), "too short"),
        (v2(addresses=inet(), tlvs=b"\x01\x00"), "truncated TLV"),
        (v2(addresses=inet(), tlvs=b"\x01\x00\x09abc"), "TLV longer"),
        (v2(addresses=inet(), tlvs=tlv(0x20, b"\x01")), "shorter than 5"),
    ],
)
def test_v2_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(data)


def test_v2_incomplete_waits() -> None:
    data = v2(family=0x21, addresses=inet6(), tlvs=tlv(0x01, b"x"))
    for cut in range(len(data)):
        assert parse_proxy_header(data[:cut]) is None


# -- reading exactly the header ----------------------------------------------------------------


def read_like_the_server(stream: bytes) -> tuple[ProxyHeader, int, int]:
    """Feed ``stream`` as the server does: never more than bytes_needed() at a time.
    Returns the header, its length and the bytes read in all."""
    buffer = b""
    while True:
        parsed = parse_proxy_header(buffer)
        if parsed is not None:
            return parsed[0], parsed[1], len(buffer)
        want = bytes_needed(buffer)
        assert want >= 1
        buffer += stream[len(buffer) : len(buffer) + want]


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 110\r\n",
        v2(command=0, family=0),
        v2(addresses=inet()),
        v2(family=0x21, addresses=inet6(), tlvs=tlv(0x20, b"\x01\0\0\0\0")),
    ],
)
def test_never_reads_past_the_header(header: bytes) -> None:
    following = b"\x16\x03\x01 a TLS ClientHello or a POP3 command"
    parsed, length, read = read_like_the_server(header + following)
    assert length == read == len(header)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_property_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        result = parse_proxy_header(data)
    except ProxyProtocolError:
        return
    if result is not None:
        _, length = result
        assert 0 < length <= len(data)
    assert bytes_needed(data) >= 1 or result is not None


@settings(max_examples=200, deadline=None)
@given(
    st.ip_addresses(v=4),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=40),
)
def test_property_v1_and_v2_agree(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int, tail: bytes) -> None:
    one = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    two = v2(addresses=src.packed + dst.packed + struct.pack("!HH", sport, dport))
    h1, n1, r1 = read_like_the_server(one + tail)
    h2, n2, r2 = read_like_the_server(two + tail)
    assert (h1.source, h1.destination) == (h2.source, h2.destination) == ((str(src), sport), (str(dst), dport))
    assert (n1, r1, n2, r2) == (len(one), len(one), len(two), len(two))
