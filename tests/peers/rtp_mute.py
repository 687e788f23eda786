"""A camera whose encoder hangs while its RTP stack lives on: a TCP proxy on loopback in front of an RTSP server
(RTP interleaved over TCP, RFC 2326 section 10.12) that, once `mute()` is called, drops the media (`$` frames on
even channels) and keeps passing RTSP answers and RTCP (odd channels), repeating the last RTCP frame every
`rtcp_every_s` so the connection is never silent for long. A recorder that only waits for the socket to go quiet
never sees this stall. `mute(marker)` mutes only the connections whose first request names `marker` (e.g. a query
in the URL: `url("/cam?one")`), so one of two cameras behind the same proxy can hang alone."""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Callable

from tests.peers.loopback_proxy import LoopbackProxy


class RtpMute(LoopbackProxy):
    name = "rtp-mute"

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", rtcp_every_s: float = 0.5):
        super().__init__(upstream_port, upstream_host)
        self.rtcp_every_s = rtcp_every_s
        self._muted = threading.Event()
        self._marker: bytes | None = None
        self.rtcp_sent_muted = 0   # RTCP frames the client got while muted (the server's and repeats)

    def mute(self, marker: str | None = None) -> None:
        self._marker = marker.encode() if marker is not None else None
        self._muted.set()

    def unmute(self) -> None:
        self._muted.clear()

    def _accepted(self, client: socket.socket) -> Callable[[], None]:
        return lambda: self._connection(client)

    def _connection(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream, timeout=5)
        upstream.settimeout(None)
        link = _Link(client)
        threading.Thread(target=_forward, args=(client, upstream, link), name="rtp-mute-requests",
                         daemon=True).start()
        threading.Thread(target=self._repeat_rtcp, args=(link,), name="rtp-mute-rtcp", daemon=True).start()
        pending = bytearray()
        try:
            while not self._closed.is_set() and (data := upstream.recv(65536)):
                pending += data
                while (frame := _next_frame(pending)) is not None:
                    self._answer(link, frame)
        except OSError:
            pass
        finally:
            link.done.set()
            client.close()
            upstream.close()

    def _answer(self, link: _Link, frame: bytes) -> None:
        """One frame from the server: RTCP and RTSP answers go on, media only while not muted."""
        if frame[0] == 0x24 and frame[1] % 2 == 1:   # RTCP
            link.last_rtcp = frame
            if self._mutes(link):
                self.rtcp_sent_muted += 1
        elif frame[0] == 0x24 and self._mutes(link):
            return
        link.send(frame)

    def _mutes(self, link: _Link) -> bool:
        return self._muted.is_set() and (self._marker is None or self._marker in link.first_request)

    def _repeat_rtcp(self, link: _Link) -> None:
        while not link.done.wait(self.rtcp_every_s):
            if self._mutes(link) and link.last_rtcp is not None:
                try:
                    link.send(link.last_rtcp)
                except OSError:
                    return
                self.rtcp_sent_muted += 1


class _Link:
    """The client's side of one connection: whole frames out, one at a time (the server's and the repeats)."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.last_rtcp: bytes | None = None
        self.first_request = b""   # the client's first bytes (its first RTSP request)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.client.sendall(data)


def _forward(source: socket.socket, sink: socket.socket, link: _Link) -> None:
    """Client to server, unchanged."""
    try:
        while data := source.recv(65536):
            if not link.first_request:
                link.first_request = data
            sink.sendall(data)
    except OSError:
        pass
    link.done.set()


def _next_frame(pending: bytearray) -> bytes | None:
    """The next whole interleaved frame or RTSP answer at the start of `pending`, taken off it; None: incomplete."""
    if not pending:
        return None
    if pending[0] == 0x24:   # '$' channel length(2) packet
        if len(pending) < 4:
            return None
        size = 4 + struct.unpack_from(">H", pending, 2)[0]
    else:
        end = pending.find(b"\r\n\r\n")
        if end < 0:
            return None
        length = re.search(rb"(?im)^content-length:\s*(\d+)", bytes(pending[:end]))
        size = end + 4 + (int(length.group(1)) if length else 0)
    if len(pending) < size:
        return None
    frame = bytes(pending[:size])
    del pending[:size]
    return frame

