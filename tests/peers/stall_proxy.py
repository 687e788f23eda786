"""A TCP proxy of the tests' own on loopback, to break the link between the agent and the broker the way
real networks do: `stall()` stops forwarding in both directions without closing anything (no FIN, no RST:
a dead mobile link or an unplugged cable upstream), `cut()` resets every connection, `heal()` forwards
again. New connections made while stalled are accepted and then hang, as they would on a dead route."""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Callable

from tests.peers.loopback_proxy import LoopbackProxy


class StallProxy(LoopbackProxy):
    name = "stall-proxy"

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        super().__init__(upstream_port, upstream_host)
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self.connections = 0

    def stall(self) -> None:
        """Stop forwarding; every socket stays open, so neither side sees the link end."""
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def cut(self) -> None:
        """Reset every open connection (RST, not FIN) and keep accepting new ones."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)

    def close(self) -> None:
        super().close()
        self._flowing.set()
        self.cut()

    def _accepted(self, client: socket.socket) -> Callable[[], None]:
        self.connections += 1
        return lambda: self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        self._flowing.wait()
        if self._closed.is_set():
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._pairs.append((client, upstream))
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.1):
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    while not self._flowing.is_set() and not self._closed.is_set():
                        self._flowing.wait(0.1)  # stalled mid-message: hold the bytes, as a dead link does
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                _reset(sock)
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
