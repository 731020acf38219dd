"""Which names hold secrets, so their values are never shown: in check-config's output, in
configuration errors, and in log events (bridge.ops.logs)."""

from __future__ import annotations

import re
from typing import Any

# Any name containing pass(word|phrase), secret, token or credential, and delete.state_key by
# name: "key" alone would also mask paths such as pop3.tls_key.
_SECRET_NAME = re.compile(r"pass|secret|token|credential|^state_key$", re.IGNORECASE)
MASK = "********"


def is_secret_name(name: str) -> bool:
    return _SECRET_NAME.search(name) is not None


def mask_secrets(value: Any, key: str = "") -> Any:
    """A copy of a dumped configuration with the value of every secret-looking key masked,
    wherever it sits (nested tables included)."""
    if isinstance(value, dict):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    # A switch is never secret (routing.send_password = true must read back as a boolean).
    if key and is_secret_name(key) and value not in (None, "", [], {}) and not isinstance(value, bool):
        return MASK
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    return value
