"""One POP3 session, in parts: the conversation with the client (`conversation`), logging in
(`login`), sending messages (`retrieval`) and numbering them (`uidl`); `services` is what the
sessions of one service share."""

from bridge.session.conversation import Pop3Session
from bridge.session.services import SharedServices

__all__ = ["Pop3Session", "SharedServices"]
