"""The stall watch's socket handling on real loopback TCP connections: the process's socket table names each
connection by fd and addresses, and a cut reaches only the connection it names, never a socket that took over
its fd number (tests/test_cameras.py holds the stalls themselves, against a real RTSP server)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from drivers.stall_watch import Watch, _shut, tcp_connections


@pytest.fixture
def server() -> Iterator[socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def connect(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    return client, accepted


def entry(client: socket.socket) -> tuple[int, tuple[str, int], tuple[str, int]]:
    return client.fileno(), client.getsockname()[:2], client.getpeername()[:2]


def test_the_socket_table_names_each_connection_by_fd_and_addresses(server: socket.socket) -> None:
    port = server.getsockname()[1]
    before = tcp_connections(port)
    first, _a = connect(server)
    second, _b = connect(server)
    try:
        assert tcp_connections(port) - before == {entry(first), entry(second)}
    finally:
        for s in (first, second, _a, _b):
            s.close()


def test_a_cut_ends_the_named_connection_and_spares_a_socket_that_took_its_fd(server: socket.socket) -> None:
    first, first_peer = connect(server)
    second, second_peer = connect(server)
    try:
        # A watch whose fd number now belongs to another connection (the first one's addresses, the second's fd)
        stale = Watch("gone", (second.fileno(), *entry(first)[1:]), 1.0, lambda: 0)
        assert not _shut(stale)
        second_peer.sendall(b"x")
        assert second.recv(1) == b"x"   # untouched

        assert _shut(Watch("east", entry(first), 1.0, lambda: 0))
        assert first.recv(1) == b""      # a read on it (FFmpeg's) now returns at once: end of stream
    finally:
        for s in (first, first_peer, second, second_peer):
            s.close()
