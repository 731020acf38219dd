"""[uidl] format: Dovecot's pop3_uidl_format variables, the presets, what a UIDL may be, and
ids from outside mapped before they are sent. (That the formats give the same UIDLs as the
real servers is tested against them: tests/integration/test_uidl_formats.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings
from bridge.config.uidl import parse_uidl_format
from bridge.session.uidl import unique_id
from bridge.uidl.formats import foreign_uidl, is_valid_uidl, uidl_format, unique_uidls

KEY = "a state key for these tests, 32+ characters"


def render(fmt: str, uid: int, uidvalidity: int) -> str:
    return uidl_format(fmt).render(uid, uidvalidity)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("dovecot", "0000002a5f5e1000"),
        ("%08Xu%08Xv", "0000002a5f5e1000"),
        ("uw", "5f5e10000000002a"),
        ("cyrus", "1600000000.42"),
        ("%v.%u", "1600000000.42"),
        ("%u", "42"),
        ("%u-%v", "42-1600000000"),
        ("%08XUu", "0000002A"),
        ("%Xv%u", "5f5e100042"),
        ("%2v%u", "1642"),  # a width without 0 cuts: the first 2 characters
        ("%1.3v%u", "60042"),  # offset 1, width 3
        ("x%%%u", "x%42"),
        ("%04u", "0042"),
    ],
)
def test_formats_render_as_dovecot_does(fmt: str, expected: str) -> None:
    assert render(fmt, 42, 1600000000) == expected


def test_the_default_format_gives_exactly_the_uidls_of_before() -> None:
    for uid, uidvalidity in [(1, 1), (42, 1600000000), (4294967295, 4294967295), (7, 0x10000)]:
        assert render("dovecot", uid, uidvalidity) == unique_id(uidvalidity, uid)
    assert load_settings(None).uidl.format == "dovecot"


@pytest.mark.parametrize(
    ("fmt", "reason"),
    [
        ("%m", "%m is not supported"),
        ("%g", "%g is not supported"),
        ("%{uid}", "%{ is not supported"),  # Dovecot 2.3's pop3_uidl_format refuses it too
        ("%v", "needs the whole UID"),
        ("%3u%v", "needs the whole UID"),
        ("static", "needs the whole UID"),
        ("a b %u", "0x21-0x7E"),
        ("%u\u00e9", "0x21-0x7E"),
        ("%061u%v", "up to 71 characters"),
    ],
)
def test_bad_formats_are_refused_with_the_reason(fmt: str, reason: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_uidl_format(fmt)
    path = tmp_path / "bridge.toml"
    path.write_text(f"[uidl]\nformat = {fmt!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=r"uidl\.format: .*" + reason.split(" ")[0]):
        load_settings(path)


def test_every_rendered_uidl_stays_within_rfc_1939() -> None:
    for fmt in ("dovecot", "uw", "cyrus", "%u", "%v.%u", "%08Xu%08Xv%08Xu%08Xv%u"):
        for uid, uidvalidity in [(1, 1), (4294967295, 4294967295)]:
            assert is_valid_uidl(render(fmt, uid, uidvalidity)), fmt


@pytest.mark.parametrize(
    "raw",
    [b"x" * 71, b"has space", b"tab\there", b"", b"caf\xc3\xa9", b"\x00", b"line\r\nbreak", b"\x7f"],
)
def test_foreign_ids_that_break_the_rule_are_mapped_never_sent(raw: bytes) -> None:
    mapped = foreign_uidl(raw)
    assert is_valid_uidl(mapped)
    assert mapped != raw.decode("latin-1")
    assert mapped.startswith("~") and len(mapped) == 33
    assert foreign_uidl(raw) == mapped  # the same every time
    assert foreign_uidl(raw + b"!") != mapped


@pytest.mark.parametrize("raw", [b"a", b"x" * 70, b"!~", b"1796043377.1", b"<msg@host>"])
def test_valid_foreign_ids_pass_as_they_are(raw: bytes) -> None:
    assert foreign_uidl(raw) == raw.decode()


def test_repeated_uidls_are_told_apart_and_the_recorded_one_keeps_its_own() -> None:
    uids = [1, 2, 3, 4]
    # Message 3 holds a recorded UIDL (rank 0) that message 1's X-UIDL (rank 1) repeats, and
    # messages 2 and 4 repeat one another at the same rank.
    out = unique_uidls(uids, ["same", "twin", "same", "twin"], [1, 2, 0, 2])
    assert out[2] == "same" and out[1] == "twin"
    assert out[0] != "same" and out[3] != "twin"
    assert len(set(out)) == 4 and all(is_valid_uidl(u) for u in out)
    assert unique_uidls(uids, ["same", "twin", "same", "twin"], [1, 2, 0, 2]) == out


@pytest.mark.parametrize("key", ["imported", "reuse_x_uidl", "keep_across_uidvalidity"])
def test_uidl_records_need_the_state_key(key: str, tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(f"[uidl]\n{key} = true\n")
    with pytest.raises(ConfigError, match=r"delete\.state_key: required when uidl\."):
        load_settings(path)
    path.write_text(f'[uidl]\n{key} = true\n[delete]\nstate_key = "{KEY}"\n')
    assert getattr(load_settings(path).uidl, key) is True


def test_a_format_alone_needs_no_state_key(tmp_path: Path) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text('[uidl]\nformat = "uw"\n')
    assert load_settings(path).uidl.format == "uw"
    path.write_text('[uidl]\nformat = "emailid"\n')
    assert load_settings(path).uidl.uses_emailid
