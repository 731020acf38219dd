"""Side-by-side benchmark: the bridge vs Dovecot's own POP3 vs Dovecot's POP3 on imapc.

Run it with `.venv/bin/python -m bench.run` (`--quick` for a small run); see
docs/performance.md. Not part of the test suite: timings belong here, never in tests.
"""
