"""One enrolled account as the token store keeps it, and the cryptography that protects it.

The record is JSON. In the clear: the account, the grant, the key-derivation parameters, the
password verifier, and what `oauth2 status` shows (token expiry, last refresh, whether the
account needs re-enrolment). Sealed: the refresh token and the cached access token.

The device password goes through scrypt (cryptography's, with the record's random salt) once
per login; HKDF splits the result into a verifier (stored, compared in constant time) and
the AES-256-GCM key that seals the tokens (never stored). A copy of the store alone is
useless: without the device password nothing decrypts, and every guess costs a scrypt. The
client secret and a service account's key are never in a record (they stay in the
configuration). The sealed part is bound to the account (AES-GCM's associated data), so it
cannot be moved into another account's record.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

FORMAT = 1
# scrypt's cost: about 0.1 s and 32 MiB per login on one core of this project's machines.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
_SALT_BYTES = 16
_NONCE_BYTES = 12
MIN_DEVICE_PASSWORD_LENGTH = 8


class RecordDamaged(Exception):
    """A stored record cannot be read (not ours, truncated, tampered with)."""


class WrongPassword(Exception):
    """The device password does not match the record's verifier."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise RecordDamaged("expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise RecordDamaged("bad base64") from None


@dataclass(frozen=True)
class Kdf:
    salt: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def fresh(cls) -> Kdf:
        return cls(os.urandom(_SALT_BYTES))


@dataclass(frozen=True)
class Keys:
    """What one device password derives, for one record's salt."""

    verifier: bytes
    sealing: bytes
    salt: bytes


def derive_keys(password: str, kdf: Kdf) -> Keys:
    """scrypt, then HKDF into the verifier and the sealing key. Slow on purpose: run it in a
    worker thread (trio.to_thread.run_sync), never on the event loop."""
    master = Scrypt(salt=kdf.salt, length=32, n=kdf.n, r=kdf.r, p=kdf.p).derive(password.encode("utf-8", "surrogateescape"))

    def expand(info: bytes) -> bytes:
        return HKDFExpand(algorithm=hashes.SHA256(), length=32, info=info).derive(master)

    return Keys(expand(b"pop3-imap-bridge oauth2 verifier"), expand(b"pop3-imap-bridge oauth2 sealing key"), kdf.salt)


@dataclass
class Tokens:
    """The secret part of a record."""

    refresh_token: str | None = None
    access_token: str | None = None
    expires_at: float = 0.0  # the access token's, epoch seconds
    lifetime: float = 0.0  # expires_in when it was issued

    def fresh(self, now: float, margin: float = 300.0) -> bool:
        """The access token has more than `margin` seconds left (at most half its lifetime,
        so a short-lived token is still used before it is refreshed again)."""
        if not self.access_token:
            return False
        return self.expires_at - now > min(margin, self.lifetime / 2)


@dataclass
class AccountRecord:
    account: str
    grant: str
    kdf: Kdf
    verifier: bytes
    sealed: bytes
    expires_at: float = 0.0
    enrolled_at: float = field(default_factory=time.time)
    last_refresh: float | None = None
    # Set when the grant died (invalid_grant): {"since": epoch, "reason": "..."}.
    reenrolment: dict[str, Any] | None = None

    @property
    def fingerprint(self) -> str:
        """Changes whenever the device password is set (a new salt each time): parked
        connections of an older password or enrolment never serve again (bridge.imap.pool)."""
        return _b64(self.kdf.salt)

    # -- sealing --------------------------------------------------------------------------------

    @classmethod
    def create(cls, account: str, grant: str, keys: Keys, kdf: Kdf, tokens: Tokens) -> AccountRecord:
        record = cls(account, grant, kdf, keys.verifier, b"")
        record.seal(keys, tokens)
        return record

    def _aad(self) -> bytes:
        return f"pop3-imap-bridge oauth2 record {FORMAT} {self.account.casefold()}".encode()

    def check(self, keys: Keys) -> None:
        """WrongPassword unless `keys` come from this record's device password."""
        if keys.salt != self.kdf.salt or not hmac.compare_digest(keys.verifier, self.verifier):
            raise WrongPassword()

    def seal(self, keys: Keys, tokens: Tokens) -> None:
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps(asdict(tokens)).encode()
        self.sealed = nonce + AESGCM(keys.sealing).encrypt(nonce, plain, self._aad())
        self.expires_at = tokens.expires_at

    def unseal(self, keys: Keys) -> Tokens:
        self.check(keys)
        nonce, ciphertext = self.sealed[:_NONCE_BYTES], self.sealed[_NONCE_BYTES:]
        try:
            data = json.loads(AESGCM(keys.sealing).decrypt(nonce, ciphertext, self._aad()))
            return Tokens(**data)
        except (InvalidTag, ValueError, TypeError):
            raise RecordDamaged("the sealed tokens do not decrypt") from None

    # -- the stored form ------------------------------------------------------------------------

    def dumps(self) -> bytes:
        return json.dumps({
            "format": FORMAT,
            "account": self.account,
            "grant": self.grant,
            "kdf": {"name": "scrypt", "salt": _b64(self.kdf.salt), "n": self.kdf.n, "r": self.kdf.r, "p": self.kdf.p},
            "verifier": _b64(self.verifier),
            "sealed": _b64(self.sealed),
            "expires_at": self.expires_at,
            "enrolled_at": self.enrolled_at,
            "last_refresh": self.last_refresh,
            "reenrolment": self.reenrolment,
        }, indent=1).encode()

    @classmethod
    def loads(cls, data: bytes) -> AccountRecord:
        """A stored record, read as hostile input (RecordDamaged if it is not a sane one)."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise RecordDamaged("unknown record format")
            kdf = raw["kdf"]
            n, r, p = (int(kdf[k]) for k in ("n", "r", "p"))
            # Bounds: a planted record must not make a login burn gigabytes or minutes.
            if kdf.get("name") != "scrypt" or not (2**10 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 16 and 1 <= p <= 4):
                raise RecordDamaged("unsupported key derivation")
            reenrolment = raw.get("reenrolment")
            return cls(
                account=str(raw["account"]),
                grant=str(raw["grant"]),
                kdf=Kdf(_unb64(kdf["salt"]), n, r, p),
                verifier=_unb64(raw["verifier"]),
                sealed=_unb64(raw["sealed"]),
                expires_at=float(raw.get("expires_at") or 0.0),
                enrolled_at=float(raw.get("enrolled_at") or 0.0),
                last_refresh=None if raw.get("last_refresh") is None else float(raw["last_refresh"]),
                reenrolment=reenrolment if isinstance(reenrolment, dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordDamaged(f"not a token record ({type(exc).__name__})") from None
