#!/usr/bin/env python3
"""Receiver flood benchmark (docs/BENCHMARKS.md, "## Receiver under a flood").

A real mosquitto and a real receiver process (`edge-agent receiver run`, behind a shared subscription, so the
orphan-chunk path is live). N honest agents (scripted, real Ed25519 keys) each send F files of S bytes, one after
the other, waiting for each one's `complete`. Run 1: alone. Run 2: the same while one more enrolled agent (a
process of its own) floods the receiver with signed manifests of 64 MiB files (new transfers: answered `busy` past
its caps) and chunks of files it never announced (orphans). Printed: the honest agents' throughput in each run
and the ratio (goal: >= 0.9), the flooder's message count, and what the flood left in the store.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from ulid import ULID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.evidence.manifest import AgentKey, canonical_json  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.peers.mosquitto import Mosquitto  # noqa: E402
from tests.sync_support import (  # noqa: E402
    ROOT as TOPIC_ROOT,
)
from tests.sync_support import (  # noqa: E402
    ScriptedAgent,
    random_bytes,
    receiver_logged,
    receiver_proc,
    receiver_setup,
)

FLOODER = "ws-flood-01"


def honest_run(port: int, keys: dict[str, AgentKey], files: int, size: int) -> float:
    """Bytes per second of every honest agent's files, each agent sending one file at a time."""
    agents = [ScriptedAgent(port, key, agent_id=name) for name, key in keys.items()]
    contents = [random_bytes(size) for _ in range(files)]

    def send(agent: ScriptedAgent) -> None:
        for content in contents:
            doc = agent.send_file(content)
            ack = agent.ack(doc["file_id"], "complete", timeout=120)
            assert ack["sha256"] == hashlib.sha256(content).hexdigest()

    threads = [threading.Thread(target=send, args=(a,)) for a in agents]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    for agent in agents:
        agent.close()
    return len(agents) * files * size / elapsed


def flood(port: int, key_dir: Path, rate: float, stop: Any, sent: Any) -> None:
    """Signed manifests of big files and orphan chunks at `rate` messages a second (QoS 1; as fast as the broker
    takes them when 0). Runs in a process of its own, as a real agent would: in the honest agents' process it
    would take their interpreter lock and measure this script rather than the receiver. A fixed rate keeps the
    load the same for every receiver measured: unpaced, a receiver that answers faster gets a faster flood."""
    flooder = ScriptedAgent(port, AgentKey.load_or_create(key_dir), agent_id=FLOODER)
    chunk = b"\0" * 65536
    count, start = 0, time.monotonic()
    while not stop.is_set():
        doc = flooder.manifest(b"", size=64 * 1024**2, sha256="ab" * 32)
        flooder.client.publish(f"{TOPIC_ROOT}/{FLOODER}/files/{doc['file_id']}/manifest", canonical_json(doc), qos=1)
        orphan = str(ULID())   # a file it never announced (no signing: the flooder's own CPU is not the load)
        info = flooder.client.publish(f"{TOPIC_ROOT}/{FLOODER}/files/{orphan}/chunk", chunk, qos=1)
        count += 2
        if count % 64 == 0:   # as fast as the broker takes them, not faster than it can
            info.wait_for_publish(10)
            sent.value = count
            while not flooder.acks.empty():   # the receiver's answers are not read: keep memory flat
                flooder.acks.get_nowait()
        if rate and (ahead := count / rate - (time.monotonic() - start)) > 0:
            stop.wait(ahead)
    sent.value = count
    flooder.close()


def receiver_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--files", type=int, default=10, help="files per honest agent")
    parser.add_argument("--size-kib", type=int, default=1024, help="bytes of each file, KiB")
    parser.add_argument("--flood-rate", type=float, default=1000, help="flood messages per second (half "
                        "manifests, half orphan chunks; the issue's flood was 500 manifests/s); 0: unpaced")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-receiver-flood-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Mosquitto(tmp / "mqtt").start()
        keys_dir = tmp / "enrolled"
        keys_dir.mkdir()
        keys = {f"ws-honest-{n:02d}": AgentKey.load_or_create(tmp / f"key-{n}") for n in range(args.agents)}
        flooder_key = AgentKey.load_or_create(tmp / "key-flood")
        for name, key in [*keys.items(), (FLOODER, flooder_key)]:
            (keys_dir / f"{name}.pem").write_text(key.public_pem())
        store = tmp / "store"
        config = receiver_setup(tmp, broker.port, store, keys_dir, shared_subscription=True,
                                max_open_transfers_per_agent=16)
        proc = receiver_proc(tmp, config).start()
        try:
            wait_for(lambda: receiver_logged(tmp, "mqtt connected"), 30, what="receiver connected")
            size = args.size_kib * 1024
            assert proc.popen is not None
            cpu0 = receiver_cpu_s(proc.popen.pid)
            alone = honest_run(broker.port, keys, args.files, size)
            cpu_alone = receiver_cpu_s(proc.popen.pid) - cpu0
            spawn = multiprocessing.get_context("spawn")
            stop, sent = spawn.Event(), spawn.Value("q", 0)
            flooder = spawn.Process(target=flood, args=(broker.port, tmp / "key-flood", args.flood_rate, stop, sent))
            flooder.start()
            wait_for(lambda: sent.value > 0, 30, what="the flood under way")
            cpu0, sent0, t0 = receiver_cpu_s(proc.popen.pid), sent.value, time.monotonic()
            flooded = honest_run(broker.port, keys, args.files, size)
            cpu_flooded = receiver_cpu_s(proc.popen.pid) - cpu0
            flood_rate = (sent.value - sent0) / (time.monotonic() - t0)
            stop.set()
            flooder.join(30)
            counts = {"messages": sent.value}
            left = sum(1 for _ in (store / "incoming" / FLOODER).iterdir()) if (store / "incoming" / FLOODER).exists() \
                else 0
            print(f"honest agents: {args.agents} x {args.files} files x {args.size_kib} KiB")
            print(f"alone:   {alone / 1024**2:7.1f} MiB/s")
            print(f"flooded: {flooded / 1024**2:7.1f} MiB/s  (flooder sent {counts['messages']} messages, "
                  f"{flood_rate:.0f}/s while measured)")
            print(f"receiver CPU: alone {cpu_alone:.2f} s, flooded {cpu_flooded:.2f} s")
            print(f"ratio:   {flooded / alone:7.2f}  (goal >= 0.90)")
            print(f"flooder's open transfers left in incoming/: {left} (cap 16)")
        finally:
            proc.stop()
            broker.stop()


if __name__ == "__main__":
    main()
