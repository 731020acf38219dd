"""What an upstream's numbers may make the bridge hold.

Without bounds a hostile or spoofed server (any upstream reached without TLS) turns one short
line into gigabytes: `* 4294967295 EXISTS` into a list of that many entries, a VANISHED range
into a set, a `{4294967295}` literal into a buffer. Past a bound the session's upstream
connection is dropped (UpstreamImplausible: the POP3 client hears -ERR [SYS/TEMP], nothing else
is affected).
"""

from __future__ import annotations

# Messages in a maildrop (EXISTS, sequence numbers, VANISHED counts): POP3 lists the whole
# maildrop at every login, which stops being of use long before a few million messages.
MAX_MAILDROP_MESSAGES = 2_000_000
# A UID is a 32-bit number (RFC 3501 nz-number), a message size at most a 63-bit one
# (RFC 9051 number64); anything else is not what the server meant.
MAX_UID = 0xFFFFFFFF
MAX_MESSAGE_SIZE = (1 << 63) - 1
# Literal bytes one command may bring back when it asked for no message body (a folder
# name, a flag list): small.
MAX_OTHER_LITERAL_BYTES = 1 << 20
# Literal bytes one FETCH of whole messages of unknown size may bring back (the bodies that
# are read into memory: read-ahead of small messages). A partial FETCH is bounded by the
# lengths it asked for instead, plus MAX_OTHER_LITERAL_BYTES.
MAX_BODY_FETCH_BYTES = 1 << 30
# fetch_texts reads at most this many bytes of each message's text (one partial FETCH):
# state records are small, and anything read back from a mailbox may be hostile.
TEXT_FETCH_LIMIT = 65536
# A message's header is read (UIDL fingerprints, X-UIDL) up to this many bytes; the rest of
# a longer one is not looked at.
HEADER_FETCH_LIMIT = 256 * 1024
