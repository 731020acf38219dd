"""pop3-imap-bridge: a POP3 server that serves the mail of an IMAP mailbox."""

__version__ = "0.1.0"
