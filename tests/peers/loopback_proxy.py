"""What the tests' TCP proxies on loopback share (rtsp_tap, rtp_mute, stall_proxy): a listening socket on a free
port, an acceptor thread, and one thread per accepted connection running what the proxy does with it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Self


class LoopbackProxy:
    name = "proxy"   # its threads' names: NAME-accept, NAME-pipe

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, name=f"{self.name}-accept", daemon=True)

    def url(self, path: str) -> str:
        return f"rtsp://127.0.0.1:{self.port}{path}"

    def start(self) -> Self:
        self._acceptor.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._server.close()

    def _accepted(self, client: socket.socket) -> Callable[[], None]:
        """What to run for a connection just accepted, on its own thread (this runs on the acceptor's, in order)."""
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._accepted(client), name=f"{self.name}-pipe", daemon=True)
            self._threads.append(thread)
            thread.start()
