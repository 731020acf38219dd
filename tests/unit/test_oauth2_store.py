"""The token records and the file store: sealing, reading a record as hostile input, atomic
writes, the per-account lock across processes, the refresh margin."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import trio

from bridge.oauth2.errors import StoreUnavailable
from bridge.oauth2.records import (
    AccountRecord,
    Kdf,
    RecordDamaged,
    Tokens,
    WrongPassword,
    derive_keys,
)
from bridge.oauth2.store import FileStore, StoreLockTimeout

# Cheap parameters for the unit tests (the stored record says which were used).
FAST = {"n": 2**10, "r": 8, "p": 1}


def _record(account: str = "alice@example.com", password: str = "device password") -> AccountRecord:
    kdf = Kdf(os.urandom(16), **FAST)
    return AccountRecord.create(account, "refresh_token", derive_keys(password, kdf), kdf, Tokens("rt-secret", "at-secret", 1e10, 3600))


def test_a_record_round_trips_and_unseals_with_its_password_only() -> None:
    record = _record()
    again = AccountRecord.loads(record.dumps())
    assert again.unseal(derive_keys("device password", again.kdf)) == Tokens("rt-secret", "at-secret", 1e10, 3600)
    with pytest.raises(WrongPassword):
        again.unseal(derive_keys("Device password", again.kdf))
    assert b"secret" not in record.dumps()


def test_the_sealed_tokens_cannot_be_moved_to_another_accounts_record() -> None:
    alice, mallory = _record("alice@example.com", "same password"), _record("mallory@example.com", "same password")
    mallory.sealed, mallory.kdf, mallory.verifier = alice.sealed, alice.kdf, alice.verifier
    with pytest.raises(RecordDamaged):
        mallory.unseal(derive_keys("same password", mallory.kdf))


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw.update(format=2),
        lambda raw: raw["kdf"].update(n=2**30),  # a planted record must not burn memory
        lambda raw: raw["kdf"].update(n=1000),
        lambda raw: raw["kdf"].update(name="pbkdf2"),
        lambda raw: raw.update(sealed="not base64!"),
        lambda raw: raw.pop("verifier"),
        lambda raw: raw.update(account=None) or raw.pop("grant"),
    ],
)
def test_a_damaged_record_is_refused(change) -> None:  # type: ignore[no-untyped-def]
    raw = json.loads(_record().dumps())
    change(raw)
    with pytest.raises(RecordDamaged):
        AccountRecord.loads(json.dumps(raw).encode())


def test_not_json_is_refused() -> None:
    for data in (b"", b"[]", b"\xff\xfe", b'{"format": 1}'):
        with pytest.raises(RecordDamaged):
            AccountRecord.loads(data)


@pytest.mark.parametrize(
    ("expires_in", "lifetime", "fresh"),
    [(3600, 3600, True), (301, 3600, True), (299, 3600, False), (40, 60, True), (29, 60, False), (0, 0, False)],
)
def test_the_refresh_margin(expires_in: float, lifetime: float, fresh: bool) -> None:
    """300 s before expiry, or half the lifetime of a shorter-lived token."""
    assert Tokens("r", "a", 1000.0 + expires_in, lifetime).fresh(1000.0, 300.0) is fresh
    assert Tokens("r", None, 1e10, 3600).fresh(1000.0) is False


async def test_the_file_store_writes_atomically_and_privately(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    await store.save("Alice@Example.com", b"one")
    await store.save("alice@example.com", b"two")  # the same account (account_key)
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert files == ["alice@example.com.json"]  # no temporary file left behind
    assert await store.load("ALICE@example.com") == b"two"
    assert (tmp_path / "store").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "store" / files[0]).stat().st_mode & 0o777 == 0o600
    assert await store.accounts() == [b"two"]
    assert await store.delete("alice@example.com") is True
    assert await store.delete("alice@example.com") is False
    assert await store.load("alice@example.com") is None


async def test_a_write_that_fails_leaves_the_old_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(str(tmp_path / "store"))
    await store.save("alice", b"old")

    def disk_full(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StoreUnavailable, match="No space left on device"):
        await store.save("alice", b"new")
    monkeypatch.undo()
    assert await store.load("alice") == b"old"
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["alice.json"]  # the temporary file is gone


async def test_any_account_name_is_one_file_inside_the_directory(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    await store.save("../../etc/passwd", b"x")
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["..%2F..%2Fetc%2Fpasswd.json"]
    assert await store.load("../../etc/passwd") == b"x"


def _hold_lock(directory: str, holding: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:
    async def hold() -> None:
        async with FileStore(directory).lock("alice", 10):
            holding.set()
            await trio.to_thread.run_sync(release.wait, 30)

    trio.run(hold)


async def test_the_file_lock_holds_across_processes(tmp_path: Path) -> None:
    directory = str(tmp_path / "store")
    context = multiprocessing.get_context("spawn")
    holding, release = context.Event(), context.Event()
    other = context.Process(target=_hold_lock, args=(directory, holding, release))
    other.start()
    try:
        assert await trio.to_thread.run_sync(holding.wait, 30)
        with pytest.raises(StoreLockTimeout):
            async with FileStore(directory).lock("alice", 0.3):
                pass
        async with FileStore(directory).lock("bob", 1):
            pass  # another account's lock is free
        release.set()
        async with FileStore(directory).lock("alice", 30):
            pass
    finally:
        release.set()
        other.join(30)
