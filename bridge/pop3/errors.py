"""The one exception type of the POP3 core.

Anything the *client* does wrong is answered on the wire with ``-ERR`` and the
session goes on, so it never becomes an exception.  What is left is misuse of
the core by the code that drives it (answering a request that was never made,
asking for the next event while a request is still open, ...).  That is a bug
on our side, so it gets its own type that nobody will mistake for a peer error
and nobody should catch in order to carry on.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError"]


class LocalProtocolError(Exception):
    """The POP3 core was driven in a way its API does not allow (our bug)."""
