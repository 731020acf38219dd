"""What the benchmark reads of the processes it measures, from Linux's /proc (and psutil).

Memory: resident set (VmRSS), its peak (VmHWM, reset through /proc/<pid>/clear_refs so a peak
is never missed between samples) and, for a server made of many processes (Dovecot), the sum
of their proportional set sizes. Connections: established TCP connections to a port, counted
on the server's side (every connection the IMAP server has, whoever opened it) or on one
process's side (the sockets in its descriptor table).
"""

from __future__ import annotations

import os
import re
import resource
import socket
import sys
from pathlib import Path

import psutil


def status_field(pid: int, name: str) -> int:
    """A "kB" field of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no {name}")


def rss_bytes(pid: int) -> int:
    return status_field(pid, "VmRSS")


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh from the current RSS (Linux, own child or root)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_bytes(pid: int) -> int:
    return status_field(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the machine's CPUs have worked so far, all of them together (from
    /proc/stat: user, nice, system, irq and softirq time; not idle, I/O wait, or time the
    hypervisor gave to others)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS summed over `pid` and all its descendants. The RSS sum counts each shared
    page (libraries, Dovecot's shared code) once per process; the PSS sum splits them. PSS
    needs the right to trace the process (a container without CAP_SYS_PTRACE lacks it for
    processes of other users): there a process's RSS stands in for its PSS, an upper bound,
    and `pss_from_rss` counts those processes."""
    rss = pss = count = from_rss = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            try:
                info = process.memory_full_info()
                process_pss = info.pss
            except psutil.AccessDenied:
                info = process.memory_info()
                process_pss = info.rss
                from_rss += 1
        except psutil.NoSuchProcess:
            continue
        rss += info.rss
        pss += process_pss
        count += 1
    return {"rss": rss, "pss": pss, "processes": count, "pss_from_rss": from_rss}


def _tcp_tables() -> bytes:
    # Read as bytes and matched with one regular expression: with tens of thousands of
    # sockets a line-by-line parse in Python would cost the benchmark client its CPU.
    parts = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            parts.append(Path(name).read_bytes())
        except FileNotFoundError:
            continue
    return b"\n".join(parts)


def _ipv4_hex(host: str) -> bytes:
    # /proc/net/tcp writes an IPv4 address as the hex of its 32 bits in host byte order.
    return b"%08X" % int.from_bytes(socket.inet_aton(host), sys.byteorder)


def server_connections(host: str, port: int) -> int:
    """Established TCP connections whose local end is host:port (IPv4) on this host: the
    connections the server listening there holds (loopback benchmark: its clients are local).

    The kernel writes its table in pieces, so one read is no snapshot: a connection can
    appear twice, and one closed and another opened between two pieces are both there (a
    client keeping exactly 200 connections while replacing 140 a second among 9,000 others
    read as up to 207). So the table is read twice and only connections (by their remote
    ends) in both reads count: each was established at the moment between the two reads,
    so the count never exceeds what the server held at one moment. It misses connections
    that did not live through both reads (the same client read as 185 at most this way), so
    while connections are replaced quickly it reads low; a server holding more than it may
    for longer than two reads (a fraction of a second) is still caught."""
    local = re.compile(
        rb"^ *\d+: %s:%04X ([0-9A-F]+:[0-9A-F]+) 01 " % (_ipv4_hex(host), port), re.MULTILINE
    )
    first = set(local.findall(_tcp_tables()))
    return len(first.intersection(local.findall(_tcp_tables())))


def process_connections_to(pid: int, host: str, port: int) -> int:
    """Established TCP connections from process `pid` to a server on host:port: its sockets
    (inodes under /proc/<pid>/fd) matched against the kernel's TCP table."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(entry.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1].encode())
    remote = re.compile(
        rb"^ *\d+: [0-9A-F]+:[0-9A-F]+ %s:%04X 01 (?:\S+ +){5}(\d+) " % (_ipv4_hex(host), port),
        re.MULTILINE,
    )
    return len(inodes.intersection(remote.findall(_tcp_tables())))


def open_descriptors(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def raise_descriptor_limit(needed: int, what: str) -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it).
    Raises RuntimeError, saying what needs it, when even the hard limit is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(
            f"{what} needs {needed:,} file descriptors but the hard limit (ulimit -Hn) is "
            f"{hard:,}; raise it (e.g. `ulimit -Hn {needed}` as root, or LimitNOFILE= in systemd)"
        )
    unlimited = resource.RLIM_INFINITY
    if hard == unlimited:
        if soft != unlimited and soft < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    elif soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
