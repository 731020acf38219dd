"""Which IMAP server (back end) serves an account: the static `[[routes]]` (`routes`), the
lookup service (`lookup`), and the two together for a login (`router`)."""
