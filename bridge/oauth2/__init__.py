"""Logging in upstream with OAuth2 while devices keep their password (docs/oauth2.md).

The bridge checks each device's password against the account's enrolment (a slow salted
hash) and logs in to the IMAP server with an OAuth2 access token (XOAUTH2 or OAUTHBEARER,
written once in bridge.imap.mailbox). Enrolments live in a token store shared by every
bridge process (`store`, `redis_store`), refresh tokens sealed with a key derived from the
device password (`records`); tokens come from the provider's token endpoint (`client`),
refreshed one at a time per account (`tokens`). `pop3-imap-bridge oauth2 ...` enrols and
manages accounts (`commands`, `flows`).
"""

from bridge.oauth2.errors import (
    DeviceLoginRefused,
    ReauthorisationNeeded,
    StoreUnavailable,
    TokenEndpointUnavailable,
    TokenRequestRefused,
)
from bridge.oauth2.tokens import OAuth2Accounts, TokenSource

__all__ = [
    "DeviceLoginRefused",
    "OAuth2Accounts",
    "ReauthorisationNeeded",
    "StoreUnavailable",
    "TokenEndpointUnavailable",
    "TokenRequestRefused",
    "TokenSource",
]
