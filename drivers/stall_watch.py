"""The stall watch: cuts a camera's RTSP connection once no video packet has come for `stall_timeout_s`.

Why not PyAV's read timeout: with one set, PyAV's interrupt callback takes the GIL at every socket wait and
every read FFmpeg makes (three reads per interleaved RTP packet), and with several cameras in one process
those hand-offs cost a measurable share of the recorder's CPU (docs/BENCHMARKS.md, "Cameras"). FFmpeg's own
socket timeout (the `timeout` option) needs no GIL but only catches a silent connection: a camera whose
encoder hangs while its RTP stack keeps sending RTCP is never silent. So the recorder opens the stream
without a read timeout and registers its connection here.

How the connection is found: no introspection of FFmpeg. `connection_of` lists the process's TCP sockets
(psutil: fd, local and remote address) just before and just after `av.open`, and takes the one that appeared,
connected to the camera's address and port. Two opens to the same host and port at once could not be told
apart, so they take turns (`opening`, one lock per host and port); opens to other cameras run freely.

How it is cut: one thread per process wakes a few times per stall timeout, and for each watched connection
compares the recorder's count of video packets with the count it saw last. A connection whose count has not
moved for `stall_timeout_s` is shut down (`shutdown(SHUT_RDWR)` on a duplicate of its fd, after checking
that the fd is still the same connection: its local and remote address), so FFmpeg's blocked read returns
and the recorder reports a stall and reconnects. The recorder withdraws its watch before it closes the
stream, under the same lock the cut is made under, so a closed and reused fd is never cut.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil

log = logging.getLogger(__name__)

TICKS_PER_TIMEOUT = 4      # checks per stall timeout: a stall is cut between 1 and 1.25 timeouts after the last packet
TICK_MIN_S = 0.1

Endpoint = tuple[str, int]
Conn = tuple[int, Endpoint, Endpoint]   # (fd, local address, remote address)


def tcp_connections(port: int) -> set[Conn]:
    """This process's established TCP connections to a remote `port`: (fd, local, remote)."""
    found = set()
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port == port and conn.fd >= 0:
            found.add((conn.fd, (conn.laddr.ip, conn.laddr.port), (conn.raddr.ip, conn.raddr.port)))
    return found


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addresses_of(host: str, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses `host` stands for (itself when it is one; else the resolver's answer, which FFmpeg has
    just asked for the same name)."""
    ip = _ip(host.strip("[]"))
    if ip is not None:
        return {ip}
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ip for info in infos if (ip := _ip(str(info[4][0]))) is not None}


@dataclass(eq=False)
class Watch:
    """One watched connection. `progress` returns the recorder's count of video packets so far."""

    camera: str
    conn: Conn
    stall_s: float
    progress: Callable[[], int]
    seen: int = -1
    moved_at: float = field(default_factory=time.monotonic)
    cut: bool = False   # set (under the watch's lock) when the stall watch shut the connection down


class StallWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watches: set[Watch] = set()
        self._opening: dict[Endpoint, threading.Lock] = {}
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def opening(self, host: str, port: int) -> Iterator[Callable[[], Conn | None]]:
        """Around one `av.open` to `host:port`: yields a function that, called once the stream is open, returns
        the connection that open made (None when it cannot be told: the caller goes on unwatched)."""
        key = (host.lower(), port)
        with self._lock:
            turn = self._opening.setdefault(key, threading.Lock())
        with turn:
            before = tcp_connections(port)

            def find() -> Conn | None:
                new = tcp_connections(port) - before
                wanted = addresses_of(host, port)
                with self._lock:
                    claimed = {w.conn for w in self._watches}
                mine = [c for c in new - claimed if _ip(c[2][0]) in wanted]
                return mine[0] if len(mine) == 1 else None

            yield find

    def watch(self, camera: str, conn: Conn, stall_s: float, progress: Callable[[], int]) -> Watch:
        w = Watch(camera, conn, stall_s, progress, seen=progress())
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="camera-stall-watch", daemon=True)
                self._thread.start()
            self._wake.notify()
        return w

    def withdraw(self, w: Watch) -> bool:
        """Stop watching (before the stream is closed); True when the watch had cut the connection."""
        with self._lock:
            self._watches.discard(w)
            return w.cut

    def _run(self) -> None:
        with self._lock:
            while True:
                if not self._watches:
                    self._wake.wait()
                    continue
                now = time.monotonic()
                for w in self._watches:
                    if w.cut:
                        continue
                    count = w.progress()
                    if count != w.seen:
                        w.seen, w.moved_at = count, now
                    elif now - w.moved_at >= w.stall_s:
                        w.cut = _shut(w)
                self._wake.wait(max(TICK_MIN_S, min(w.stall_s for w in self._watches) / TICKS_PER_TIMEOUT))


def _shut(w: Watch) -> bool:
    """Shut the watched connection down, if its fd is still that connection."""
    fd, local, remote = w.conn
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if (_ip(sock.getsockname()[0]), sock.getsockname()[1]) != (_ip(local[0]), local[1]) or \
                (_ip(sock.getpeername()[0]), sock.getpeername()[1]) != (_ip(remote[0]), remote[1]):
            return False
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        sock.close()
    log.warning("camera_stall_cut camera=%s stall_timeout_s=%s", w.camera, w.stall_s)
    return True


STALL_WATCH = StallWatch()
