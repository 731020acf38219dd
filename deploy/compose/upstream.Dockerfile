# The demo upstream of deploy/docker-compose.yml: Debian's Dovecot (the same packages the test
# suite runs against), started and seeded with demo mail by the project's sandbox code
# (sandbox/, standard library only; not part of the bridge's package).
#   Build context: the repository root.
FROM python:3.11-slim-bookworm
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dovecot-imapd dovecot-pop3d \
    && rm -rf /var/lib/apt/lists/*
COPY sandbox /opt/pop3-imap-bridge-demo/sandbox
COPY deploy/compose/demo_upstream.py /usr/local/bin/demo_upstream.py
# Dovecot needs root to start (it drops to "nobody" for mail access, see sandbox/dovecot.py).
ENV PYTHONUNBUFFERED=1 DEMO_WORKDIR=/srv/demo-upstream PYTHONPATH=/opt/pop3-imap-bridge-demo
EXPOSE 143
CMD ["python", "/usr/local/bin/demo_upstream.py"]
