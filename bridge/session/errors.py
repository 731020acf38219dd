"""How a session ends early."""

from __future__ import annotations


class EndSession(Exception):
    """Stop the session now, without a reply (the reason is logged where it is raised);
    `outcome` is what `session_end` and the sessions metric record."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome
