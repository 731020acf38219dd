"""UIDLs beyond the default: configured formats, X-UIDL headers, UIDLs imported from an old
POP3 server, and UIDLs kept across a change of the maildrop's UIDVALIDITY.

The pure pieces (`formats`, `headers`, `matching`, `records`) know no I/O; `store` reads and
writes the signed records in the state folder, `serving` works out a session's UIDLs at
login (with `memory`, what a process remembers between logins, `facts`, the fingerprints of
new messages, and `rematch`), and `old_server`, `importer` and `command` are
`pop3-imap-bridge uidl import`. How it fits
together is in docs/design.md ("UIDLs").
"""
