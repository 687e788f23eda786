#!/usr/bin/env python3
"""Sync benchmark: one run, one mosquitto, real processes (docs/BENCHMARKS.md, "## Sync").

1. Backlog drain after an outage: `edge-agent import` seals a backlog while the
   broker is down; the agent (`edge-agent run`) and a receiver
   (`edge-agent receiver run`) are started, then the broker; timed until every
   file is `synced` in the agent's catalog (agent -> broker -> receiver, every
   chunk and the whole file verified, stored, acked). The agent's peak RSS is
   sampled throughout.
2. Baseline: raw paho QoS 1 publishes of the same number of bytes in the same
   chunk size, publisher process -> broker -> subscriber process, with as many
   messages in flight as the agent's window.
3. A backlog drain under a bandwidth cap: the rate on the link (chunk bytes as
   the broker delivers them, first to last chunk) against the cap.

With --encrypt sm4-gcm,aes-256-gcm: the backlog drain again with the agent's store encrypted at rest by each
algorithm listed (`[store] encrypt`, edge_agent/atrest.py: every chunk decrypted on its way out), against the
plaintext drain of the same run.

The issue asks for a 20 GB backlog and a 4 GB RSS run; the default here is
scaled down (--backlog-gb 2, --capped-mb 256) to run in a few minutes on the
project's 2-core machines. Pass --backlog-gb 20 for the full size (needs about
4x that in free disk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.config import MqttSection  # noqa: E402
from tests.helpers import write_toml  # noqa: E402
from tests.peers.mosquitto import Mosquitto, free_port  # noqa: E402
from tests.sync_support import pin_receiver_key  # noqa: E402

PY = sys.executable
AGENT_ID = "ws-bench-01"


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "edge_agent.cli", *args], check=True, **kwargs)


def make_files(folder: Path, total: int, file_size: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(1 << 20))
    made, i = 0, 0
    while made < total:
        size = min(file_size, total - made)
        with open(folder / f"REC{i:05d}.MP4", "wb") as out:
            left, n_block = size, 0
            while left:
                block[:16] = i.to_bytes(8, "big") + n_block.to_bytes(8, "big")   # every file's bytes differ
                n = min(left, len(block))
                out.write(block[:n])
                left, n_block = left - n, n_block + 1
        made += size
        i += 1
    return i


def catalog_counts(db: Path) -> dict[str, int]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return {}


def wait_for_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not in {path} after {timeout}s")


def watch_online(port: int) -> threading.Event:
    """An event set when the agent publishes its `online` status."""
    import paho.mqtt.client as mqtt

    online = threading.Event()

    def on_message(client, _u, message) -> None:
        if json.loads(message.payload).get("state") == "online":
            online.set()
            client.disconnect()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-watch", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe(f"evidence/v2/{AGENT_ID}/status", qos=1)
    client.loop_start()
    return online


class WireMeter:
    """Counts the agent's chunk bytes as the broker delivers them: the rate on the link, first to last chunk."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.samples: list[tuple[float, int]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-meter", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.samples.append((time.monotonic(), len(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"evidence/v2/{AGENT_ID}/files/+/chunk", qos=0)
        self.client.loop_start()

    def rate(self) -> float:
        self.client.disconnect()
        self.client.loop_stop()
        (first, _), (last, _) = self.samples[0], self.samples[-1]
        return sum(n for _, n in self.samples[1:]) / (last - first)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used so far."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def switches(pid: int | str = "self") -> int:
    """Context switches (voluntary and not) of every thread of a process so far: each is a thread that slept
    waiting for another (a queue, a lock, the GIL, the disk) or was preempted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue   # a thread that ended meanwhile
    return total


def peak_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    import psutil

    proc = psutil.Process(pid)
    while not stop.wait(0.1):
        try:
            out.append(proc.memory_info().rss)
        except psutil.Error:
            return


LOG_SIGNS = {   # what a drain's logs say went wrong, counted per drain (each line one occurrence)
    "receiver_dropped_over_share": "event=agent_flooding",      # the receiver's per-agent queue was full
    "agent_ack_timeouts": "querying the receiver",              # the agent heard nothing for ack_timeout_s
    "agent_resends": "resending manifest and what it lacks",    # a `receiving` ack with a reason
    "broker_dropped": "Outgoing messages are being dropped",    # mosquitto's queue limits
}


def log_signs(*logs: Path) -> dict[str, int]:
    text = "".join(log.read_text(errors="replace") for log in logs if log.exists())
    return {name: text.count(sign) for name, sign in LOG_SIGNS.items()}


def drain_logs(work: Path) -> tuple[Path, ...]:
    return work / "agent.log", work / "receiver.log", work / "broker" / "mosquitto.log"


def keep(work: Path, into: Path) -> None:
    """Copies of a drain's logs in `into`, named after the drain."""
    into.mkdir(parents=True, exist_ok=True)
    for log_path in drain_logs(work):
        if log_path.exists():
            shutil.copy(log_path, into / f"{work.name}-{log_path.name}")


def drain(work: Path, port: int, *, backlog: int, file_size: int, chunk_kib: int, window: int,
          cap_kbps: int | None, encrypt: str | None = None, keep_logs: Path | None = None) -> dict:
    """Seal a backlog while the agent is offline (`edge-agent import`), then start the agent against a running
    broker and receiver; time from its `online` status to the last file `synced` in its catalog."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data_dir = work / "data"
    data_dir.mkdir(mode=0o750)
    mqtt = {"port": port, "chunk_kib": chunk_kib, "window": window, "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.2}
    if cap_kbps:
        mqtt["bandwidth_kbps"] = cap_kbps
    mqtt["receiver_keys"] = str(work / "pinned")   # the receiver's receipt key, pinned before the agent starts
    pin_receiver_key(work / "received" / "keys", work / "pinned", "receiver")
    agent_toml = write_toml(work / "agent.toml", {
        "agent": {"id": AGENT_ID, "site": "bench", "unit": "bench", "data_dir": str(data_dir),
                  "max_disk_gb": 1000, "min_free_mb": 0, "verify_readback": False},
        "mqtt": mqtt, **encrypted_store(work, encrypt)})
    files = make_files(work / "card", backlog, file_size)
    cli("--config", str(agent_toml), "import", str(work / "card"), "--device", "DSJ-BENCH-1",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(work / "card")
    keys = json.loads(cli("--config", str(agent_toml), "--json", "keys", "show", capture_output=True).stdout)
    (work / "keys").mkdir()
    (work / "keys" / f"{AGENT_ID}.pem").write_text(keys["public_key_pem"])
    receiver_toml = write_toml(work / "receiver.toml", {
        "mqtt": {"port": port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2},
        "receiver": {"store_dir": str(work / "received"), "keys_dir": str(work / "keys")}})
    logs = [open(work / "agent.log", "w"), open(work / "receiver.log", "w")]
    broker = Mosquitto(work / "broker", port=port).start()
    receiver = subprocess.Popen([PY, "-m", "edge_agent.cli", "receiver", "run", "--config", str(receiver_toml)],
                                stderr=logs[1])
    wait_for_log(work / "receiver.log", "mqtt connected")
    online = watch_online(port)
    meter = WireMeter(port)
    agent = subprocess.Popen([PY, "-m", "edge_agent.cli", "--config", str(agent_toml), "run"], stderr=logs[0])
    samples: list[int] = []
    receiver_samples: list[int] = []
    stop = threading.Event()
    threading.Thread(target=peak_rss, args=(agent.pid, stop, samples), daemon=True).start()
    threading.Thread(target=peak_rss, args=(receiver.pid, stop, receiver_samples), daemon=True).start()
    if not online.wait(60):
        raise RuntimeError(f"the agent did not come online; see {work}/agent.log")
    started = time.monotonic()
    cpu_start = {name: cpu_seconds(proc.pid) for name, proc in
                 (("agent", agent), ("receiver", receiver), ("broker", broker.proc))}
    switches_start = {"agent": switches(agent.pid), "receiver": switches(receiver.pid)}
    db = data_dir / "catalog.sqlite"
    try:
        while True:
            counts = catalog_counts(db)
            done = counts.get("synced", 0) + counts.get("source_cleared", 0)
            if done == files:
                break
            if counts.get("rejected") or agent.poll() is not None or receiver.poll() is not None:
                raise RuntimeError(f"drain failed: {counts}; see {work}/agent.log and receiver.log")
            if time.monotonic() - started > 3600:
                raise RuntimeError(f"drain did not finish in an hour: {counts}")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = {name: round(cpu_seconds(proc.pid) - cpu_start[name], 2) for name, proc in
               (("agent", agent), ("receiver", receiver), ("broker", broker.proc))}
        switched = {"agent": switches(agent.pid) - switches_start["agent"],
                    "receiver": switches(receiver.pid) - switches_start["receiver"]}
    finally:
        stop.set()
        for proc in (agent, receiver):
            proc.send_signal(signal.SIGTERM)
        for proc in (agent, receiver):
            proc.wait(30)
        broker.stop()
        for log in logs:
            log.close()
        if keep_logs is not None:
            keep(work, keep_logs)
    signs = log_signs(*drain_logs(work))
    stored = sum(p.stat().st_size for p in (work / "received" / "objects").rglob("*")
                 if p.is_file() and not p.name.endswith(".json"))
    if stored != backlog:
        raise RuntimeError(f"receiver stored {stored} bytes, backlog was {backlog}")
    return {"files": files, "bytes": backlog, "seconds": elapsed, "mb_s": backlog / elapsed / 1e6,
            "link_mb_s": meter.rate() / 1e6, "peak_rss_mb": max(samples, default=0) / 2**20,
            "receiver_peak_rss_mb": max(receiver_samples, default=0) / 2**20,
            "cpu_s": cpu, "switches": switched, "load": os.getloadavg()[0], "log_signs": signs}


def encrypted_store(work: Path, encrypt: str | None) -> dict:
    """The agent config's `[store]` that encrypts with `encrypt` (none when None), its key outside the data dir."""
    if encrypt is None:
        return {}
    key = work / "store.key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    return {"store": {"encrypt": encrypt, "key_file": str(key)}}


# -- raw paho baseline --------------------------------------------------------------------------------


def raw_publisher(port: int, count: int, size: int, inflight: int) -> None:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw-pub", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.connect("127.0.0.1", port)
    client.loop_start()
    payload = os.urandom(size)
    print(json.dumps({"start": time.time(), "cpu": time.process_time(), "switches": switches()}), flush=True)
    infos = [client.publish("bench/raw", payload, qos=1) for _ in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    print(json.dumps({"cpu": time.process_time(), "switches": switches()}), flush=True)
    client.disconnect()
    client.loop_stop()


def raw_subscriber(port: int, count: int) -> None:
    import paho.mqtt.client as mqtt

    got = threading.Event()
    seen = [0]

    def on_message(_c, _u, _m) -> None:
        seen[0] += 1
        if seen[0] == count:
            got.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw-sub", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_: print(json.dumps({"ready": True, "cpu": time.process_time(),
                                                                   "switches": switches()}), flush=True)
    client.connect("127.0.0.1", port)
    client.subscribe("bench/raw", qos=1)
    client.loop_start()
    got.wait(3600)
    print(json.dumps({"end": time.time(), "cpu": time.process_time(), "switches": switches()}), flush=True)
    client.disconnect()
    client.loop_stop()


def raw(work: Path, port: int, *, total: int, chunk: int, inflight: int) -> dict:
    broker = Mosquitto(work / "raw-broker", port=port).start()
    count = -(-total // chunk)
    me = [PY, str(Path(__file__).resolve())]
    try:
        sub = subprocess.Popen([*me, "--raw-role", "sub", "--port", str(port), "--count", str(count)],
                               stdout=subprocess.PIPE, text=True)
        ready = json.loads(sub.stdout.readline())
        assert ready.get("ready")
        broker_cpu = cpu_seconds(broker.proc.pid)
        pub = subprocess.run([*me, "--raw-role", "pub", "--port", str(port), "--count", str(count),
                              "--chunk", str(chunk), "--inflight", str(inflight)],
                             stdout=subprocess.PIPE, text=True, check=True)
        pub_start, pub_end = (json.loads(line) for line in pub.stdout.splitlines()[:2])
        sub_end = json.loads(sub.stdout.readline())
        broker_cpu = cpu_seconds(broker.proc.pid) - broker_cpu
        start, end = pub_start["start"], sub_end["end"]
        sub.wait(30)
    finally:
        broker.stop()
    elapsed = end - start
    cpu = {"publisher": round(pub_end["cpu"] - pub_start["cpu"], 2),
           "subscriber": round(sub_end["cpu"] - ready["cpu"], 2), "broker": round(broker_cpu, 2)}
    switched = {"publisher": pub_end["switches"] - pub_start["switches"],
                "subscriber": sub_end["switches"] - ready["switches"]}
    return {"bytes": count * chunk, "seconds": elapsed, "mb_s": count * chunk / elapsed / 1e6, "cpu_s": cpu,
            "switches": switched, "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog-gb", type=float, default=2.0, help="uncapped backlog (the issue: 20)")
    parser.add_argument("--file-mb", type=int, default=256, help="size of each backlog file")
    parser.add_argument("--capped-mb", type=int, default=256, help="backlog drained under the cap (64 MiB files)")
    parser.add_argument("--cap-mbit", type=float, default=80.0, help="bandwidth cap, Mbit/s")
    parser.add_argument("--chunk-kib", type=int, default=MqttSection().chunk_kib, help="the agent's default")
    parser.add_argument("--window", type=int, default=MqttSection().window, help="the agent's default")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--encrypt", default="", help="comma-separated [store] encrypt algorithms (sm4-gcm, "
                        "aes-256-gcm): the backlog drain again with each, against the plaintext drain")
    parser.add_argument("--keep-logs", type=Path, default=None,
                        help="copy each drain's agent, receiver and broker logs into this folder")
    parser.add_argument("--raw-role", choices=["pub", "sub"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inflight", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_role == "pub":
        raw_publisher(args.port, args.count, args.chunk, args.inflight)
        return
    if args.raw_role == "sub":
        raw_subscriber(args.port, args.count)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.work))
    chunk = args.chunk_kib * 1024
    backlog = int(args.backlog_gb * 1024**3)
    port = free_port()
    try:
        ours = drain(work / "drain", port, backlog=backlog, file_size=args.file_mb * 2**20,
                     chunk_kib=args.chunk_kib, window=args.window, cap_kbps=None, keep_logs=args.keep_logs)
        shutil.rmtree(work / "drain")
        encrypted = {}
        for algorithm in [a for a in args.encrypt.split(",") if a]:
            encrypted[algorithm] = drain(work / f"drain-{algorithm}", port, backlog=backlog,
                                         file_size=args.file_mb * 2**20, chunk_kib=args.chunk_kib,
                                         window=args.window, cap_kbps=None, encrypt=algorithm)
            encrypted[algorithm]["ratio_vs_plain"] = encrypted[algorithm]["mb_s"] / ours["mb_s"]
            shutil.rmtree(work / f"drain-{algorithm}")
        baseline = raw(work, port, total=backlog, chunk=chunk, inflight=args.window)
        cap_kbps = int(args.cap_mbit * 1000)
        capped = drain(work / "capped", port, backlog=args.capped_mb * 2**20, file_size=64 * 2**20,
                       chunk_kib=args.chunk_kib, window=args.window, cap_kbps=cap_kbps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cap_mb_s = cap_kbps * 1000 / 8 / 1e6
    result = {
        "chunk_kib": args.chunk_kib, "window": args.window,
        "backlog": ours, "raw_paho_qos1": baseline, "ratio": ours["mb_s"] / baseline["mb_s"],
        "backlog_20gb_extrapolated_s": ours["seconds"] * 20 * 1024**3 / backlog,
        "capped": capped, "cap_mb_s": cap_mb_s, "cap_ratio": capped["link_mb_s"] / cap_mb_s,
        **({"encrypted": encrypted} if encrypted else {}),
    }
    print(json.dumps(result, indent=2))
    print(f"\nend-to-end verified: {ours['mb_s']:.0f} MB/s ({ours['bytes'] / 2**30:.1f} GiB in {ours['files']} files, "
          f"{ours['seconds']:.1f} s); raw paho QoS 1: {baseline['mb_s']:.0f} MB/s; ratio {result['ratio']:.2f}x")
    for algorithm, e in encrypted.items():
        print(f"store encrypt={algorithm}: {e['mb_s']:.0f} MB/s ({e['seconds']:.1f} s), {e['ratio_vs_plain']:.2f}x "
              f"the plaintext store's drain; agent peak RSS {e['peak_rss_mb']:.0f} MiB")
    per_gib = 2**30 / ours["bytes"]
    ours_cpu, raw_cpu = sum(ours["cpu_s"].values()) * per_gib, sum(baseline["cpu_s"].values()) * per_gib
    print("CPU seconds per GiB: ours " + ", ".join(f"{k} {v * per_gib:.2f}" for k, v in ours["cpu_s"].items())
          + f" (sum {ours_cpu:.2f}); raw " + ", ".join(f"{k} {v * per_gib:.2f}" for k, v in baseline["cpu_s"].items())
          + f" (sum {raw_cpu:.2f}); raw/ours {raw_cpu / ours_cpu:.2f}; "
          f"load {ours['load']:.1f} / {baseline['load']:.1f}")
    chunks = ours["bytes"] / chunk
    print("context switches per chunk: ours " + ", ".join(f"{k} {v / chunks:.1f}" for k, v in ours["switches"].items())
          + "; raw " + ", ".join(f"{k} {v / chunks:.1f}" for k, v in baseline["switches"].items()))
    print("in the logs of the drain: " + ", ".join(f"{k} {v}" for k, v in ours["log_signs"].items()))
    print(f"agent peak RSS during the {ours['bytes'] / 2**30:.1f} GiB drain: {ours['peak_rss_mb']:.0f} MiB; "
          f"receiver's {ours['receiver_peak_rss_mb']:.0f} MiB")
    print(f"20 GB backlog at this rate: {result['backlog_20gb_extrapolated_s'] / 60:.1f} min (extrapolated)")
    print(f"capped at {args.cap_mbit:.0f} Mbit/s ({cap_mb_s:.2f} MB/s): {capped['link_mb_s']:.2f} MB/s on the link, "
          f"first to last chunk ({result['cap_ratio'] * 100:.1f} % of the cap); {capped['bytes'] / 2**20:.0f} MiB "
          f"drained in {capped['seconds']:.1f} s ({capped['mb_s']:.2f} MB/s with start-up and the final commit)")


if __name__ == "__main__":
    main()
