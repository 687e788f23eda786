#!/usr/bin/env python3
"""Scale benchmarks (issue 6).

`catalog`: a catalog of N file rows (default 1,000,000, bulk-inserted in one transaction) with a large
unsynced backlog, against a baseline catalog of 1,000 rows with the same mix, built in the same run:
start-up recovery (`Ingestor.recover`), next-file selection (`Catalog.next_to_send`) and `edge-agent status`
(the real CLI in a subprocess). Prints each figure, its baseline and the ratio.

`agents`: N simulated agents (default 500: lightweight paho clients of our own, in a few processes, each
with its own Ed25519 key enrolled at the receiver) each send small signed files and a retained health message
through one mosquitto to one receiver, then to two receivers sharing an MQTT 5 subscription. Prints files lost,
receiver throughput and manifest-to-`complete` latency p50/p99; the baseline is one agent sending the same
total number of files, in the same run.

Usage: .venv/bin/python scripts/bench_scale.py catalog [--rows 1000000]
       .venv/bin/python scripts/bench_scale.py agents [--agents 500] [--files 4] [--kib 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.catalog import LANE_CAMERA, LANE_RECORDER, Catalog, new_id, now_ms  # noqa: E402
from edge_agent.config import parse_config  # noqa: E402
from edge_agent.evidence.manifest import AgentKey  # noqa: E402
from edge_agent.ingest import Ingestor, Sealer  # noqa: E402
from edge_agent.layout import StoreLayout  # noqa: E402

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

# The mix of a busy site after a week-long uplink outage: most history synced or purged, a tenth unsynced.
MIX = (("purged", 0.60), ("source_cleared", 0.20), ("synced", 0.099), ("sealed", 0.10),
       ("sending", 0.0001), ("staged", 0.0004), ("discovered", 0.0005))


def build_catalog(data_dir: Path, rows: int, seed: int = 6) -> tuple[Path, float]:
    """A catalog of `rows` file rows in MIX proportions; returns (config path, seconds to insert)."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    os.chmod(data_dir, 0o750)
    config_path = data_dir.parent / f"{data_dir.name}.toml"
    config_path.write_text(f'[agent]\nid = "ws-scale"\nsite = "s"\nunit = "u"\ndata_dir = "{data_dir}"\n'
                           "min_free_mb = 0\n")
    catalog = Catalog(data_dir / "catalog.sqlite")
    start_ms = now_ms() - 30 * 86_400_000
    states = [s for s, share in MIX for _ in range(max(1, round(share * rows)))][:rows]
    states += ["purged"] * (rows - len(states))
    rng.shuffle(states)
    began = time.perf_counter()
    with catalog.transaction() as conn:
        batch = []
        for i, state in enumerate(states):
            created = start_ms + i * (30 * 86_400_000 // rows)
            done = state in ("staged", "sealed", "sending", "synced", "source_cleared", "purged")
            lane = LANE_CAMERA if i % 3 == 0 else LANE_RECORDER
            batch.append((new_id(), state, "camera" if lane == LANE_CAMERA else "recorder", f"DEV{i % 400:04d}",
                          f"DCIM/100/F{i:08d}.MP4", 10_000_000 + i % 1000, 1_700_000_000_000_000_000 + i,
                          created - 60_000, created, rng.randrange(1 << 20, 200 << 20) if done else None,
                          f"{i:064x}" if done else None, f"store/{i % 256:02x}/F{i:08d}.mp4"
                          if done and state != "purged" else None, lane, created, created,
                          created + 5_000 if state in ("synced", "source_cleared", "purged") else None))
            if len(batch) == 50_000:
                _insert(conn, batch)
                batch = []
        _insert(conn, batch)
    seconds = time.perf_counter() - began
    catalog.conn.execute("ANALYZE")
    catalog.close()
    return config_path, seconds


def _insert(conn, batch: list[tuple]) -> None:
    conn.executemany(
        "INSERT INTO files (file_id, state, kind, device_id, original_path, source_size, source_mtime_ns,"
        " recorded_start_ms, created_ms, size, sha256, store_path, lane, updated_ms, ingested_at_ms, synced_ms,"
        " retention, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'routine',0)", batch)


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def measure(config_path: Path) -> dict[str, float]:
    import tomllib

    cfg = parse_config(tomllib.loads(config_path.read_text()), config_path)
    layout = StoreLayout(cfg.agent.data_dir)
    layout.create()
    catalog = Catalog(cfg.catalog_path)
    sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, cfg)
    ingestor = Ingestor(catalog, layout, sealer, cfg)
    out = {"recover_s": timed(ingestor.recover, 1)}  # once: it moves staged rows back to discovered
    out["recover_again_s"] = timed(ingestor.recover, 3)
    out["next_to_send_s"] = timed(lambda: catalog.next_to_send(1), 20)
    out["next_to_send_window_s"] = timed(lambda: catalog.next_to_send(4, exclude={"a", "b", "c"}), 20)
    out["counts_by_state_s"] = timed(catalog.counts_by_state, 5)
    out["store_bytes_s"] = timed(ingestor.store_bytes, 5)  # asked before every copy (the disk limit)
    catalog.close()
    out["cli_status_s"] = timed(lambda: subprocess.run([EDGE_AGENT, "--config", str(config_path), "--json",
                                                        "status"], check=True, capture_output=True), 3)
    return out


def bench_catalog(rows: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        base_cfg, base_insert = build_catalog(Path(tmp) / "base", 1_000)
        big_cfg, big_insert = build_catalog(Path(tmp) / "big", rows)
        size_mb = (Path(tmp) / "big" / "catalog.sqlite").stat().st_size / 2**20
        base, big = measure(base_cfg), measure(big_cfg)
    print(f"catalog scale: {rows:,} rows ({size_mb:.0f} MiB, inserted in {big_insert:.1f} s) vs baseline 1,000 rows"
          f" (inserted in {base_insert:.3f} s); mix {', '.join(f'{s} {p:.2%}' for s, p in MIX)}")
    print(f"{'what':<26}{'ours (ms)':>12}{'baseline (ms)':>15}{'ratio':>9}")
    for key in big:
        print(f"{key:<26}{big[key] * 1000:>12.1f}{base[key] * 1000:>15.1f}{big[key] / base[key]:>9.1f}")
    print(json.dumps({"rows": rows, "ours": big, "baseline": base}))


# -- many agents, one broker, one or two receivers -------------------------------------------------------

ROOT_TOPIC = "evidence/v2"


def _sim_agents(port: int, agents: list[tuple[str, bytes]], files: int, size: int, start_at: float,
                results: Any) -> None:
    """One process of simulated agents: each connects, publishes health, sends `files` signed single-chunk
    files at `start_at`, and waits for their `complete` acks. Puts (latencies, lost, bytes) on `results`."""
    import hashlib as _hashlib
    import threading as _threading

    import paho.mqtt.client as mqtt
    from cryptography.hazmat.primitives import serialization

    from edge_agent.evidence.manifest import AgentKey, canonical_json
    from edge_agent.protocol.wire import ChunkHeader, encode_chunk

    latencies: list[float] = []
    pending: dict[str, float] = {}
    lock = _threading.Lock()
    done = _threading.Event()
    clients = []

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        ack = json.loads(msg.payload)
        if ack.get("state") == "complete":
            with lock:
                began = pending.pop(ack["file_id"], None)
                if began is not None:
                    latencies.append(time.monotonic() - began)
                if not pending:
                    done.set()
        elif ack.get("state") == "rejected":
            print(f"rejected {ack}", file=sys.stderr)

    connected = _threading.Semaphore(0)
    for agent_id, pem in agents:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=mqtt.MQTTv5)
        client.on_message = on_message
        client.on_connect = lambda c, _u, _f, _r, _p, a=agent_id: (c.subscribe(f"{ROOT_TOPIC}/{a}/acks", qos=1),
                                                                   connected.release())
        client.connect("127.0.0.1", port, keepalive=60)
        client.loop_start()
        key = AgentKey(serialization.load_pem_private_key(pem, None))  # type: ignore[arg-type]
        clients.append((agent_id, client, key))
    for _ in clients:
        connected.acquire(timeout=60)
    time.sleep(max(0.0, start_at - time.time()))
    rng = random.Random(hash(agents[0][0]))
    sent_bytes = 0
    for agent_id, client, key in clients:
        client.publish(f"{ROOT_TOPIC}/{agent_id}/health", json.dumps({"agent_id": agent_id, "ts_ms": now_ms(),
                       "queue_files": files}).encode(), qos=1, retain=True)
        for _ in range(files):
            data = rng.randbytes(size)
            digest = _hashlib.sha256(data).hexdigest()
            file_id = new_id()
            manifest = key.sign({"v": 1, "type": "file", "file_id": file_id, "agent_id": agent_id, "size": size,
                                 "sha256": digest, "chunk_size": max(size, 256 * 1024), "prev": "0" * 64})
            with lock:
                pending[file_id] = time.monotonic()
            client.publish(f"{ROOT_TOPIC}/{agent_id}/files/{file_id}/manifest", canonical_json(manifest), qos=1)
            client.publish(f"{ROOT_TOPIC}/{agent_id}/files/{file_id}/chunk",
                           encode_chunk(ChunkHeader(0, 0, size, digest), data), qos=1)
            sent_bytes += size
    done.wait(timeout=300)
    with lock:
        lost = len(pending)
    for _agent_id, client, _key in clients:
        client.disconnect()
        client.loop_stop()
    results.put((latencies, lost, sent_bytes))


def _receivers(base: Path, port: int, count: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(count):
        config = base / f"receiver-{i}.toml"
        config.write_text(f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n[receiver]\nstore_dir = "{base / "store"}"\n'
                          f'keys_dir = "{base / "keys"}"\nclient_id = "receiver-{i + 1}"\n'
                          f"shared_subscription = {'true' if count > 1 else 'false'}\nack_interval_ms = 50\n")
        log = open(base / f"receiver-{i}.log", "ab")  # noqa: SIM115 - handed to the child
        procs.append(subprocess.Popen([EDGE_AGENT, "receiver", "run", "--config", str(config)], stdout=log,
                                      stderr=log))
    return procs


def run_agents(base: Path, port: int, agent_keys: list[tuple[str, bytes]], files: int, size: int,
               receivers: int, processes: int) -> dict[str, float]:
    import multiprocessing

    shutil.rmtree(base / "store", ignore_errors=True)
    procs = _receivers(base, port, receivers)
    time.sleep(2.0)   # the receivers subscribe (a script: no event to await across processes)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 3 + len(agent_keys) / 200
    groups = [agent_keys[i::processes] for i in range(processes)]
    workers = [ctx.Process(target=_sim_agents, args=(port, g, files, size, start_at, results)) for g in groups if g]
    for w in workers:
        w.start()
    latencies: list[float] = []
    lost = total_bytes = 0
    for _ in workers:
        lat, lo, by = results.get(timeout=600)
        latencies += lat
        lost += lo
        total_bytes += by
    finished = time.time()
    for w in workers:
        w.join()
    for proc in procs:
        proc.terminate()
        proc.wait(30)
    stored = len(list((base / "store" / "index").rglob("*.json")))
    elapsed = max(finished - start_at, 1e-9)
    latencies.sort()
    return {"agents": len(agent_keys), "receivers": receivers, "files": len(agent_keys) * files,
            "stored": stored, "lost": lost, "seconds": elapsed, "files_per_s": stored / elapsed,
            "mb_per_s": total_bytes / elapsed / 1e6,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "p99_ms": (latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies
                       else float("nan"))}


def bench_agents(agents: int, files: int, kib: int, processes: int) -> None:
    import resource

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tests.peers.mosquitto import Mosquitto

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="bench-agents-") as tmp:
        base = Path(tmp)
        (base / "keys").mkdir()
        keys = []
        for i in range(agents):
            agent_id = f"ws-sim-{i:05d}"
            private = Ed25519PrivateKey.generate()
            pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            (base / "keys" / f"{agent_id}.pem").write_bytes(private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            keys.append((agent_id, pem))
        broker = Mosquitto(base / "broker").start()
        try:
            size = kib * 1024
            baseline = run_agents(base, broker.port, keys[:1], files * agents, size, 1, 1)
            one = run_agents(base, broker.port, keys, files, size, 1, processes)
            two = run_agents(base, broker.port, keys, files, size, 2, processes)
        finally:
            broker.stop()
    print(f"{agents} simulated agents x {files} files of {kib} KiB, one mosquitto; baseline: 1 agent sending "
          f"the same {agents * files} files")
    print(f"{'run':<34}{'stored':>8}{'lost':>6}{'s':>8}{'files/s':>9}{'MB/s':>7}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'files/s vs baseline':>21}")
    for name, r in (("baseline: 1 agent, 1 receiver", baseline), (f"{agents} agents, 1 receiver", one),
                    (f"{agents} agents, 2 receivers ($share)", two)):
        print(f"{name:<34}{r['stored']:>8}{r['lost']:>6}{r['seconds']:>8.1f}{r['files_per_s']:>9.1f}"
              f"{r['mb_per_s']:>7.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['files_per_s'] / baseline['files_per_s']:>21.2f}")
    print(json.dumps({"baseline": baseline, "one_receiver": one, "two_receivers": two}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    cat = sub.add_parser("catalog", help="1,000,000-row catalog: recovery, next-file selection, status")
    cat.add_argument("--rows", type=int, default=1_000_000)
    many = sub.add_parser("agents", help="500 simulated agents against one, then two receivers")
    many.add_argument("--agents", type=int, default=500)
    many.add_argument("--files", type=int, default=4)
    many.add_argument("--kib", type=int, default=32)
    many.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    if args.what == "catalog":
        bench_catalog(args.rows)
    else:
        bench_agents(args.agents, args.files, args.kib, args.processes)


if __name__ == "__main__":
    main()
