"""The stall watch: cuts a camera's RTSP connection once no video packet has come for `stall_timeout_s`.

Why not PyAV's read timeout: with one set, PyAV's interrupt callback takes the GIL at every socket wait and
every read FFmpeg makes (three reads per interleaved RTP packet), and with several cameras in one process
those hand-offs cost a measurable share of the recorder's CPU (docs/BENCHMARKS.md, "Cameras"). FFmpeg's own
socket timeout (the `timeout` option) needs no GIL but only catches a silent connection: a camera whose
encoder hangs while its RTP stack keeps sending RTCP is never silent. So the recorder opens the stream
without a read timeout and registers its connection here.

How the connection is found: no introspection of FFmpeg. `StallWatch.opening` lists the process's TCP
sockets (psutil: fd, local and remote address) just before and just after `av.open`, and takes the one that
appeared, connected to the camera's address and port. Two connections made at once to the same host and port
(two channels of one NVR) could not be told apart, so opens to one address take turns while connecting: the
next one waits until the one before it has its connection, not until it has finished opening.

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
POLL_S = 0.05              # an open waiting for the one before it to have its connection looks this often

Endpoint = tuple[str, int]
IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Conn = tuple[int, Endpoint, Endpoint]   # (fd, local address, remote address)


def tcp_connections(port: int) -> set[Conn]:
    """This process's established TCP connections to a remote `port`: (fd, local, remote)."""
    found = set()
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_ESTABLISHED and conn.raddr and conn.raddr.port == port and conn.fd >= 0:
            found.add((conn.fd, (conn.laddr.ip, conn.laddr.port), (conn.raddr.ip, conn.raddr.port)))
    return found


def _ip(text: str) -> IP | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addresses_of(host: str, port: int) -> set[IP]:
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


@dataclass(eq=False)
class _Opening:
    """One `av.open` under way: the connections to its port before it began, and its own once known."""

    before: set[Conn]
    mine: Conn | None = None


class StallWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._watches: set[Watch] = set()
        self._holders: dict[Endpoint, _Opening] = {}   # per host and port: the open whose connection is not yet known
        self._known: set[Conn] = set()                 # connections known to be an open's, not yet watched
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def opening(self, host: str, port: int) -> Iterator[Callable[[], Conn | None]]:
        """Around one `av.open` to `host:port`: yields a function that, called once the stream is open, returns
        the connection that open made (None when it cannot be told: the caller goes on unwatched).

        Opens to one host and port overlap except while a connection is being made: an open waits until the
        one before it has its connection (it looks for it itself, every `POLL_S`), then takes its own snapshot.
        So between one open's snapshot and its connection, no other open to that address adds one."""
        key = (host.lower(), port)
        me = self._take_turn(key, host, port)
        try:
            def find() -> Conn | None:
                if me.mine is not None and me.mine not in tcp_connections(port):
                    with self._lock:   # the connection the next open saw was closed again (FFmpeg reconnected)
                        self._known.discard(me.mine)
                    me.mine = None
                if me.mine is None:
                    me.mine = self._new_connection(me, addresses_of(host, port), port)
                self._end_turn(key, me)
                return me.mine

            yield find
        finally:
            self._end_turn(key, me)
            with self._lock:
                self._known.discard(me.mine)

    def _take_turn(self, key: Endpoint, host: str, port: int) -> _Opening:
        wanted = None
        while True:
            with self._lock:
                holder = self._holders.get(key)
                if holder is None:
                    me = self._holders[key] = _Opening(tcp_connections(port))
                    return me
            if wanted is None:
                wanted = addresses_of(host, port)
            found = self._new_connection(holder, wanted, port)   # the open before this one: its connection yet?
            with self._lock:
                if found is not None and self._holders.get(key) is holder and holder.mine is None:
                    holder.mine = found
                    self._known.add(found)
                    del self._holders[key]
                    continue
            time.sleep(POLL_S)

    def _end_turn(self, key: Endpoint, me: _Opening) -> None:
        with self._lock:
            if self._holders.get(key) is me:
                del self._holders[key]
            if me.mine is not None:
                self._known.add(me.mine)

    def _new_connection(self, opening: _Opening, wanted: set[IP], port: int) -> Conn | None:
        """The one connection to `port` at one of the `wanted` addresses made since `opening` began and not
        another open's; None: none yet, or more than one (which cannot be told apart)."""
        new = tcp_connections(port) - opening.before
        with self._lock:
            taken = {w.conn for w in self._watches} | self._known
        mine = [c for c in new - taken if _ip(c[2][0]) in wanted]
        return mine[0] if len(mine) == 1 else None

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
                    try:
                        count = w.progress()
                        if count != w.seen:
                            w.seen, w.moved_at = count, now
                        elif now - w.moved_at >= w.stall_s:
                            w.cut = _shut(w)
                    except Exception:   # a bug must not end the watch of every camera: log, go on
                        log.exception("camera_stall_watch_fault camera=%s", w.camera)
                self._wake.wait(max(TICK_MIN_S, min(w.stall_s for w in self._watches) / TICKS_PER_TIMEOUT))


def _same(address: tuple, endpoint: Endpoint) -> bool:
    """A socket's address (IPv4, or IPv6 with flow and scope) is `endpoint`, however the IP is written."""
    return (_ip(address[0]), address[1]) == (_ip(endpoint[0]), endpoint[1])


def _shut(w: Watch) -> bool:
    """Shut the watched connection down, if its fd is still that connection."""
    fd, local, remote = w.conn
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        if not (_same(sock.getsockname(), local) and _same(sock.getpeername(), remote)):
            return False
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        sock.close()
    log.warning("camera_stall_cut camera=%s stall_timeout_s=%s", w.camera, w.stall_s)
    return True


STALL_WATCH = StallWatch()
