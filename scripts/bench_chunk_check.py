#!/usr/bin/env python3
"""Per-chunk CPU of the chunk check on each side, in one process (docs/BENCHMARKS.md, "CRC-32 chunk checks").

Agent: `prepare_chunk` (read a 512 KiB chunk of a stored file into its frame, check it, write the header) with a
SHA-256 header against a CRC-32 one. Receiver: `chunk_data_check` of the frames (the checker thread's pass).
Alternated, several rounds, thread CPU time (what survives a loaded machine better than wall clock); the file is
in the page cache, as a backlog being drained mostly is not, so the disk read is left out of both sides alike.

Then (`--publish`, needs mosquitto): the CPU of this process publishing the same chunks at QoS 1 with 32 in
flight, stock paho `mqtt.Client` against `connection.Client` (large packets queued as a memoryview), alternated;
and the decode of a received chunk's PUBLISH on paho's network thread: paho's `decode_publish` of the whole
packet against `connection.Client`'s (the payload cut off once, paho decoding the header only).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paho.mqtt import _packet  # noqa: E402

from edge_agent.protocol.connection import Client, publish_header_size  # noqa: E402
from edge_agent.protocol.wire import chunk_data_check  # noqa: E402
from edge_agent.sync.sender import prepare_chunk  # noqa: E402
from tests.peers.mosquitto import Mosquitto  # noqa: E402


def publish_cpu_s_per_gib(cls: type[mqtt.Client], port: int, chunk: int, count: int) -> float:
    """CPU seconds (user + system, this process: the caller's and paho's threads) per GiB published."""
    client = cls(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{cls.__module__}", protocol=mqtt.MQTTv5)
    in_flight, done = threading.Semaphore(32), threading.Semaphore(0)

    def published(*_args: object) -> None:
        in_flight.release()
        done.release()

    client.on_publish = published
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = bytearray(os.urandom(chunk))
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(count):
        in_flight.acquire()
        client.publish("bench/chunk", payload, qos=1)
    for _ in range(count):
        done.acquire()
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.disconnect()
    client.loop_stop()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return cpu / (count * chunk / 1024**3)


def decode_us(chunk: int, count: int = 200) -> dict[str, float]:
    """Thread CPU µs to decode one received chunk PUBLISH (MQTT 5, QoS 1, a chunk topic), paho's way and ours."""
    topic = b"evidence/v2/ws-bench-01/files/01M8A4CX94HKS6DD50ABZSJKXQ/chunk"
    packet = bytearray(len(topic).to_bytes(2, "big") + topic + b"\x00\x07\x00" + os.urandom(chunk + 120))
    out = {}
    start = time.thread_time()
    for _ in range(count):
        _packet.decode_publish(0x32, packet, mqtt.MQTTv5)
    out["paho decode_publish"] = (time.thread_time() - start) / count * 1e6
    start = time.thread_time()
    for _ in range(count):
        split = publish_header_size(packet, 1, True)
        with memoryview(packet) as view, view[split:] as payload:
            bytes(payload)
        _packet.decode_publish(0x32, packet[:split], mqtt.MQTTv5)
    out["connection.Client"] = (time.thread_time() - start) / count * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="file size")
    parser.add_argument("--chunk-kib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--publish", action="store_true", help="also paho's publish path, stock against ours")
    args = parser.parse_args()
    chunk, size = args.chunk_kib * 1024, args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        path.write_bytes(os.urandom(size))
        total = -(-size // chunk)
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for check in ("sha256", "crc32"):
                start = time.thread_time()
                frames = [prepare_chunk(path, seq, size, chunk, check=check) for seq in range(total)]
                agent = (time.thread_time() - start) / total * 1e6
                start = time.thread_time()
                for frame in frames:
                    chunk_data_check(frame)
                receiver = (time.thread_time() - start) / total * 1e6
                del frames
                results.setdefault(f"agent {check}", []).append(agent)
                results.setdefault(f"receiver {check}", []).append(receiver)
    per_gib = 1024 * 1024 * 1024 / chunk / 1e6
    for name, values in results.items():
        print(f"{name:16s} median {statistics.median(values):7.1f} us/chunk ({statistics.median(values) * per_gib:.2f}"
              f" CPU s/GiB), range {min(values):.1f}-{max(values):.1f}")
    if args.publish:
        with tempfile.TemporaryDirectory() as tmp:
            broker = Mosquitto(Path(tmp))
            broker.start()
            try:
                cpu: dict[str, list[float]] = {"stock paho": [], "connection.Client": []}
                for _ in range(args.rounds):
                    cpu["stock paho"].append(publish_cpu_s_per_gib(mqtt.Client, broker.port, chunk, 1024))
                    cpu["connection.Client"].append(publish_cpu_s_per_gib(Client, broker.port, chunk, 1024))
            finally:
                broker.stop()
        for name, values in cpu.items():
            print(f"publish, {name:18s} median {statistics.median(values):.2f} CPU s/GiB, "
                  f"range {min(values):.2f}-{max(values):.2f}")
        decodes: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, value in decode_us(chunk).items():
                decodes.setdefault(name, []).append(value)
        for name, values in decodes.items():
            print(f"receive decode, {name:19s} median {statistics.median(values):6.1f} us/chunk "
                  f"({statistics.median(values) * per_gib:.2f} CPU s/GiB), range {min(values):.1f}-{max(values):.1f}")
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
