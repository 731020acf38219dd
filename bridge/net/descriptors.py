"""A socket's file descriptor, for code that reads and writes it directly (the POP3 client's
plain socket, the trio engine's plain IMAP socket) rather than through Trio's streams.

The number is asked of the socket at each use, never kept: once a socket is closed its
number is free, and the next connection accepted or opened may get it, so a read or write
through a kept number would reach another connection.
"""

from __future__ import annotations

from typing import Protocol

import trio


class HasDescriptor(Protocol):
    def fileno(self) -> int: ...


def descriptor_of(sock: HasDescriptor, connection: str) -> int:
    """`sock`'s descriptor now; trio.ClosedResourceError ("the `connection` was closed") if
    it is closed."""
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError(f"the {connection} was closed")
    return fd
