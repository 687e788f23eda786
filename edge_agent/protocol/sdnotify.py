"""systemd's notify protocol (sd_notify(3)) in a few lines: one datagram to $NOTIFY_SOCKET.

Without systemd (no NOTIFY_SOCKET) every call is a no-op, so a daemon runs the same by hand. Here, beside the
MQTT connection, because both the agent (ops/sdnotify.py: the watchdog ping withheld while a part is stalled)
and the receiver (platform/receiver/supervise.py) speak it, and the platform may not import ops.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", "WATCHDOG=1", "STATUS=…") to systemd. True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:  # a stale NOTIFY_SOCKET (inherited by a manual run) must not stop the daemon
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc.strerror)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1: half of WatchdogSec, if systemd asked this process for pings."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
