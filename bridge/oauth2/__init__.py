"""Logging in upstream with OAuth2 while devices keep their password (docs/oauth2.md).

The bridge checks each device's password against the account's enrolment (a slow salted
hash) and logs in to the IMAP server with an OAuth2 access token (XOAUTH2 or OAUTHBEARER,
written once in bridge.imap.mailbox). Enrolments live in a token store shared by every
bridge process (`store`, `redis_store`), refresh tokens sealed with a key derived from the
device password (`records`); tokens come from the provider's token endpoint (`client`),
refreshed one at a time per account (`tokens`). `pop3-imap-bridge oauth2 ...` enrols and
manages accounts (`command_line`, `commands`, `flows`).
"""

# Only the errors here: importing the package (login.py catches them) must not load the token
# store and the crypto library, which a bridge without OAuth2 never needs (`tokens` is
# imported at the first OAuth2 login, bridge.session.services).
from bridge.oauth2.errors import (
    DeviceLoginRefused,
    ReauthorisationNeeded,
    StoreUnavailable,
    TokenEndpointUnavailable,
    TokenRequestRefused,
)

__all__ = [
    "DeviceLoginRefused",
    "ReauthorisationNeeded",
    "StoreUnavailable",
    "TokenEndpointUnavailable",
    "TokenRequestRefused",
]
