"""What a failed upstream connect is reported as (bridge.imap.trio_engine.connect): the
system's own words, also when trio reports them only as the cause of "all attempts failed"."""

from __future__ import annotations

import errno
import os

from bridge.imap.trio_engine.connect import _reason


def test_the_attempts_own_error_is_named() -> None:
    attempt = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    wrapper = OSError("all attempts to connect to imap.example.net:143 failed")
    wrapper.__cause__ = ExceptionGroup("attempts", [attempt])
    assert _reason(wrapper) == "Too many open files"
    assert _reason(OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))) == "Network is unreachable"
    assert _reason(OSError("no detail")) == "OSError"
