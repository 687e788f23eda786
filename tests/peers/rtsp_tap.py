"""What an RTSP server sent one client, byte for byte: a TCP proxy on loopback that forwards both ways and
keeps, per connection, everything the server wrote. With RTP over TCP (RFC 2326 section 10.12, interleaved
`$` frames), that is every RTP packet the client was sent; `pictures()` depacketizes the video ones
(RFC 6184 single NAL unit, STAP-A and FU-A for H.264; RFC 7798 single, AP and FU for H.265) into the
NAL units of each picture, so a test can compare a recording with what the camera sent it."""

from __future__ import annotations

import re
import select
import socket
import struct
from collections.abc import Callable

from tests.peers.loopback_proxy import LoopbackProxy


class RtspTap(LoopbackProxy):
    name = "rtsp-tap"

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        super().__init__(upstream_port, upstream_host)
        self.sent: list[bytearray] = []   # per connection, in order: what the server wrote to it

    def close(self) -> None:
        super().close()
        for thread in self._threads:
            thread.join(5)

    def _accepted(self, client: socket.socket) -> Callable[[], None]:
        record = bytearray()
        self.sent.append(record)
        return lambda: self._pipe(client, record)

    def _pipe(self, client: socket.socket, record: bytearray) -> None:
        upstream = socket.create_connection(self.upstream, timeout=5)
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    if sock is upstream:
                        record += data
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def rtp(self, connection: int, channel: int) -> list[bytes]:
        """The RTP packets the server sent on one interleaved channel of a connection (the first SETUP's
        RTP is channel 0), skipping its RTSP answers."""
        data = bytes(self.sent[connection])
        packets, off = [], 0
        while off < len(data):
            if data[off] == 0x24:   # '$' channel length(2) packet
                if off + 4 > len(data):
                    break
                ch, size = data[off + 1], struct.unpack_from(">H", data, off + 2)[0]
                if off + 4 + size > len(data):
                    break
                if ch == channel:
                    packets.append(data[off + 4:off + 4 + size])
                off += 4 + size
                continue
            end = data.find(b"\r\n\r\n", off)   # an RTSP answer: headers, then Content-Length bytes
            if end < 0:
                break
            length = re.search(rb"(?im)^content-length:\s*(\d+)", data[off:end])
            off = end + 4 + (int(length.group(1)) if length else 0)
        return packets

    def pictures(self, video: str, connection: int = 0, channel: int = 0) -> list[list[bytes]]:
        """The video pictures sent on a connection, each as its NAL units (no start codes), grouped by RTP
        timestamp; an FU not finished when the tap closed is left out."""
        hevc = video == "h265"
        header = 2 if hevc else 1
        pictures: list[list[bytes]] = []
        stamp: int | None = None
        fragment = bytearray()
        for rtp in self.rtp(connection, channel):
            payload = rtp[12 + 4 * (rtp[0] & 0x0F):]
            if rtp[0] & 0x10:   # header extension
                payload = payload[4 + 4 * int.from_bytes(payload[2:4], "big"):]
            (timestamp,) = struct.unpack_from(">I", rtp, 4)
            if timestamp != stamp:
                pictures.append([])
                stamp = timestamp
            kind = (payload[0] >> 1) & 0x3F if hevc else payload[0] & 0x1F
            if kind == (48 if hevc else 24):   # aggregation packet
                at = header
                while at + 2 <= len(payload):
                    length = int.from_bytes(payload[at:at + 2], "big")
                    pictures[-1].append(payload[at + 2:at + 2 + length])
                    at += 2 + length
            elif kind == (49 if hevc else 28):   # fragmentation unit
                fu = payload[header]
                if fu & 0x80:   # start: the NAL unit's header, rebuilt from the payload header and FU header
                    fragment[:] = (bytes([(payload[0] & 0x81) | ((fu & 0x3F) << 1), payload[1]]) if hevc
                                   else bytes([(payload[0] & 0xE0) | (fu & 0x1F)]))
                fragment += payload[header + 1:]
                if fu & 0x40:   # end
                    pictures[-1].append(bytes(fragment))
            else:
                pictures[-1].append(payload)
        return pictures
