"""systemd's readiness protocol (sd_notify(3)) in a few lines of the standard library: with `Type=notify`, systemd
puts a datagram socket's path in NOTIFY_SOCKET and waits for "READY=1" before it calls the service started (and
starts units ordered after it). The gateway says READY=1 once it listens, RELOADING=1 … READY=1 around a SIGHUP
reload, and STOPPING=1 when it begins to drain.

Without NOTIFY_SOCKET (not under systemd) every call does nothing; a socket that cannot be reached is logged at
debug level and never stops the server.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("bastion.service")


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", newline-separated assignments) to NOTIFY_SOCKET. Returns whether
    it was sent. A path starting with "@" is in the abstract namespace (a leading NUL byte on the wire)."""
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path[0] not in "/@":  # e.g. "vsock:…", for virtual machines: not ours to speak
        log.debug("NOTIFY_SOCKET %r is not a unix socket path; not notifying systemd", path)
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("cannot notify systemd at %s: %s", path, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    # MONOTONIC_USEC: what Type=notify-reload (systemd 253) asks for with RELOADING=1; harmless for Type=notify
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
