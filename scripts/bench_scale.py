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

With `--hosts netns` (the default; run as root) each receiver runs on a test host of its own: a network
namespace joined to this host by a veth link (tests/netns.py), reaching mosquitto and SeaweedFS only over it.
`--store local,s3` runs everything twice: receivers sharing one local store_dir, then receivers sharing
nothing but SeaweedFS buckets (Object Lock for committed files, `[store] transfers = "s3"`). Each run also
reports the CPU seconds of every receiver (per GB and per file), of the broker and of SeaweedFS, and the
1-minute load; `--profile PATH` records the one-receiver run with py-spy and prints where it spent its time.

Usage: .venv/bin/python scripts/bench_scale.py catalog [--rows 1000000]
       .venv/bin/python scripts/bench_scale.py agents [--agents 500] [--files 4] [--kib 32]
           [--store local,s3] [--hosts netns|loopback] [--rounds 2] [--baseline] [--profile /tmp/prof]
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


def _send_again(sent: dict[str, tuple[Any, bytes, bytes, int]], lock: Any, file_id: str) -> None:
    """Publish a file's manifest and chunk again (at most 30 times)."""
    with lock:
        again = sent.get(file_id)
        if again is None or again[3] >= 30:
            return
        sent[file_id] = (*again[:3], again[3] + 1)
    client, manifest, chunk = again[:3]
    base = f"{ROOT_TOPIC}/{client._client_id.decode()}/files/{file_id}"
    client.publish(f"{base}/manifest", manifest, qos=1)
    client.publish(f"{base}/chunk", chunk, qos=1)


def _sim_agents(host: str, port: int, agents: list[tuple[str, bytes]], files: int, size: int, start_at: float,
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
    sent: dict[str, tuple[Any, bytes, bytes, int]] = {}   # file id -> (client, manifest, chunk, times sent again)
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
                sent.pop(ack["file_id"], None)
        elif ack.get("state") == "rejected":
            print(f"rejected {ack}", file=sys.stderr)
        elif "no manifest" in str(ack.get("reason")):
            # As a real agent does (sync/transfer.py): the chunk reached a receiver before its manifest (behind a
            # shared subscription, or a manifest dropped): the manifest again, then the chunk.
            _send_again(sent, lock, ack["file_id"])

    connected = _threading.Semaphore(0)
    for agent_id, pem in agents:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=agent_id, protocol=mqtt.MQTTv5)
        client.on_message = on_message
        client.on_connect = lambda c, _u, _f, _r, _p, a=agent_id: (c.subscribe(f"{ROOT_TOPIC}/{a}/acks", qos=1),
                                                                   connected.release())
        client.connect(host, port, keepalive=60)
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
            manifest_bytes, chunk_bytes = canonical_json(manifest), encode_chunk(ChunkHeader(0, 0, size, digest), data)
            with lock:
                pending[file_id] = time.monotonic()
                sent[file_id] = (client, manifest_bytes, chunk_bytes, 0)
            client.publish(f"{ROOT_TOPIC}/{agent_id}/files/{file_id}/manifest", manifest_bytes, qos=1)
            client.publish(f"{ROOT_TOPIC}/{agent_id}/files/{file_id}/chunk", chunk_bytes, qos=1)
            sent_bytes += size
    done.wait(timeout=300)
    with lock:
        lost = len(pending)
    for _agent_id, client, _key in clients:
        client.disconnect()
        client.loop_stop()
    results.put((latencies, lost, sent_bytes))


LOCKED_BUCKET, TRANSFERS_BUCKET = "bench-locked", "bench-transfers"


class Rig:
    """Where a run happens: the broker (and SeaweedFS, for store = "s3") on this host, listening on `host`
    (loopback, or the host side of the test hosts' links); receivers on this host or each on a test host of
    its own (`hosts`, network namespaces from tests/netns.py)."""

    def __init__(self, base: Path, host: str, port: int, hosts: Any = None, seaweed: Any = None):
        self.base, self.host, self.port, self.hosts, self.seaweed = base, host, port, hosts, seaweed
        self.run = 0

    def receiver_config(self, i: int, count: int) -> Path:
        run_dir = self.base / f"run-{self.run}"
        store_dir = run_dir / ("store" if self.seaweed is None else f"receiver-{i}")   # local: one shared store
        config = run_dir / f"receiver-{i}.toml"
        text = (f'[mqtt]\nhost = "{self.host}"\nport = {self.port}\n[receiver]\nstore_dir = "{store_dir}"\n'
                f'keys_dir = "{self.base / "keys"}"\nclient_id = "receiver-{i + 1}"\n'
                f"shared_subscription = {'true' if count > 1 else 'false'}\nack_interval_ms = 50\n"
                # No session left behind at the broker: an offline member of the share group still gets its
                # share queued (mosquitto), which the next run's receiver with this client id would then store.
                "session_expiry_s = 0\n")
        if self.seaweed is not None:
            text += (f'[store]\nbackend = "s3"\nendpoint = "{self.seaweed.endpoint}"\nbucket = "{LOCKED_BUCKET}"\n'
                     f'credentials_file = "{self.seaweed.credentials_file(self.base)}"\ntransfers = "s3"\n'
                     f'transfers_bucket = "{TRANSFERS_BUCKET}"\n')
        config.write_text(text)
        return config

    def start_receivers(self, count: int) -> list[subprocess.Popen[bytes]]:
        self.run += 1
        (self.base / f"run-{self.run}").mkdir()
        procs = []
        for i in range(count):
            argv = [EDGE_AGENT, "receiver", "run", "--config", str(self.receiver_config(i, count))]
            if self.hosts is not None:
                argv = self.hosts[i].command(argv)
            log = open(self.base / f"run-{self.run}" / f"receiver-{i}.log", "ab")  # noqa: SIM115 - the child's
            procs.append(subprocess.Popen(argv, stdout=log, stderr=log))
        return procs

    def stored(self) -> int:
        """Index entries in the current run's store (local), or in the committed bucket (all runs)."""
        if self.seaweed is None:
            return len(list((self.base / f"run-{self.run}" / "store" / "index").rglob("*.json")))
        s3, count, args = self.seaweed.client(), 0, {"Bucket": LOCKED_BUCKET, "Prefix": "index/"}
        while True:
            page = s3.list_objects_v2(**args)
            count += page.get("KeyCount", 0)
            if not page.get("IsTruncated"):
                return count
            args["ContinuationToken"] = page["NextContinuationToken"]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _profile(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy recording the receiver `pid` (collapsed stacks, with idle threads left out) until it exits."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not installed (.venv/bin/pip install py-spy): no profile", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100", "--threads",
                             "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise_profile(path: Path, top: int = 12) -> list[tuple[str, float]]:
    """The functions where the recorded receiver spent its samples (self time), as shares of all samples."""
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        leaf = frames[-1].split(" (")[0] if frames else "?"
        thread = frames[0] if frames else "?"
        key = f"{thread[:40]} > {leaf}"
        own[key] = own.get(key, 0) + n
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return [(k, v / max(total, 1)) for k, v in ranked]


def run_agents(rig: Rig, broker_pid: int, agent_keys: list[tuple[str, bytes]], files: int, size: int,
               receivers: int, processes: int, profile: Path | None = None) -> dict[str, Any]:
    import multiprocessing

    procs = rig.start_receivers(receivers)
    stored_before = rig.stored()   # the buckets are kept from run to run (a local run has a store of its own)
    logs = [rig.base / f"run-{rig.run}" / f"receiver-{i}.log" for i in range(receivers)]
    deadline = time.monotonic() + 120
    while not all(b"mqtt connected" in log.read_bytes() for log in logs):   # slow to start on a loaded machine
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError(f"receivers not connected; see {logs}")
        time.sleep(0.1)
    time.sleep(1.0)   # and subscribed (the SUBACK follows the connect; nothing logs it)
    spy = _profile(procs[0].pid, profile) if profile is not None else None
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    start_at = time.time() + 3 + len(agent_keys) / 200
    groups = [agent_keys[i::processes] for i in range(processes)]
    workers = [ctx.Process(target=_sim_agents, args=(rig.host, rig.port, g, files, size, start_at, results))
               for g in groups if g]
    for w in workers:
        w.start()
    time.sleep(max(0.0, start_at - time.time()))
    load = os.getloadavg()[0]
    broker_cpu = cpu_s(broker_pid)
    store_cpu = cpu_s(rig.seaweed.process.pid) if rig.seaweed is not None else 0.0
    receiver_cpu = [cpu_s(p.pid) for p in procs]
    latencies: list[float] = []
    lost = total_bytes = 0
    for _ in workers:
        lat, lo, by = results.get(timeout=600)
        latencies += lat
        lost += lo
        total_bytes += by
    finished = time.time()
    receiver_cpu = [cpu_s(p.pid) - before for p, before in zip(procs, receiver_cpu, strict=True)]
    broker_cpu = cpu_s(broker_pid) - broker_cpu
    store_cpu = (cpu_s(rig.seaweed.process.pid) - store_cpu) if rig.seaweed is not None else float("nan")
    for w in workers:
        w.join()
    for proc in procs:
        proc.terminate()
        proc.wait(30)
    if spy is not None:
        spy.wait(30)
    stored = rig.stored() - stored_before
    elapsed = max(finished - start_at, 1e-9)
    latencies.sort()
    gb = total_bytes / 1e9
    return {"agents": len(agent_keys), "receivers": receivers, "files": len(agent_keys) * files,
            "stored": stored, "lost": lost, "seconds": elapsed, "files_per_s": stored / elapsed,
            "mb_per_s": total_bytes / elapsed / 1e6, "load_1min": load,
            "receiver_cpu_s": receiver_cpu, "receiver_cpu_s_per_gb": [c / gb for c in receiver_cpu],
            "receiver_cpu_ms_per_file": [c * 1000 / max(stored, 1) for c in receiver_cpu],
            "broker_cpu_s": broker_cpu, "store_cpu_s": store_cpu,
            "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
            "p99_ms": (latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000 if latencies
                       else float("nan"))}


def _agent_keys(keys_dir: Path, agents: int) -> list[tuple[str, bytes]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys_dir.mkdir()
    keys = []
    for i in range(agents):
        agent_id = f"ws-sim-{i:05d}"
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        (keys_dir / f"{agent_id}.pem").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        keys.append((agent_id, pem))
    return keys


def _print_runs(title: str, runs: list[tuple[str, dict[str, Any]]], baseline: dict[str, Any]) -> None:
    print(title)
    print(f"{'run':<40}{'stored':>7}{'lost':>5}{'s':>7}{'files/s':>9}{'MB/s':>6}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'ratio':>7}{'load':>6}  receiver CPU s/GB (ms/file); broker CPU s; store CPU s")
    for name, r in runs:
        cpu = ", ".join(f"{g:.0f} ({f:.1f})" for g, f in zip(r["receiver_cpu_s_per_gb"], r["receiver_cpu_ms_per_file"],
                                                              strict=True))
        print(f"{name:<40}{r['stored']:>7}{r['lost']:>5}{r['seconds']:>7.1f}{r['files_per_s']:>9.1f}"
              f"{r['mb_per_s']:>6.1f}{r['p50_ms']:>8.0f}{r['p99_ms']:>8.0f}"
              f"{r['files_per_s'] / baseline['files_per_s']:>7.2f}{r['load_1min']:>6.1f}  {cpu}; "
              f"{r['broker_cpu_s']:.1f}; {r['store_cpu_s']:.1f}")


def bench_agents(agents: int, files: int, kib: int, processes: int, stores: list[str], hosts_mode: str,
                 baseline: bool, profile: Path | None, keep: bool = False, rounds: int = 2) -> None:
    import contextlib
    import resource

    from tests.netns import NetnsUnavailable, TestHosts
    from tests.peers.mosquitto import Mosquitto
    from tests.seaweedfs import SeaweedFS

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="bench-agents-")
        if keep:
            print(f"work directory (kept): {tmp}")
        else:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        base = Path(tmp)
        keys = _agent_keys(base / "keys", agents)
        hosts, host = None, "127.0.0.1"
        if hosts_mode == "netns":
            try:
                hosts = stack.enter_context(TestHosts(2))
                host = hosts.host_ip
            except NetnsUnavailable as exc:
                print(f"receivers on loopback: {exc}", file=sys.stderr)
        # `user root`: mosquitto keeps the rights to its log in this run's temporary directory.
        broker = Mosquitto(base / "broker", host=host, extra="user root\n").start()
        stack.callback(broker.stop)
        assert broker.proc is not None
        size = kib * 1024
        where = f"receivers on {'test hosts (netns)' if hosts is not None else 'loopback'}"
        for store in stores:
            seaweed = None
            if store == "s3":
                seaweed = SeaweedFS(base / "seaweedfs", s3_host=host)
                seaweed.start()
                stack.callback(seaweed.stop)
                s3 = seaweed.client()
                s3.create_bucket(Bucket=LOCKED_BUCKET, ObjectLockEnabledForBucket=True)
                s3.create_bucket(Bucket=TRANSFERS_BUCKET)
            rig = Rig(base / f"rig-{store}", host, broker.port, hosts, seaweed)
            rig.base.mkdir()
            (rig.base / "keys").symlink_to(base / "keys")
            runs = []
            if baseline:   # one agent with every file: its share of the receiver's fair queue caps it (flood guard)
                runs.append(("baseline: 1 agent, 1 receiver",
                             run_agents(rig, broker.proc.pid, keys[:1], files * agents, size, 1, 1)))
            ratios = []
            for round_ in range(1, rounds + 1):   # alternating, so that both see the same shared machine
                one = run_agents(rig, broker.proc.pid, keys, files, size, 1, processes,
                                 profile.with_suffix(f".{store}.txt") if profile and round_ == 1 else None)
                two = run_agents(rig, broker.proc.pid, keys, files, size, 2, processes)
                runs += [(f"r{round_}: {agents} agents, 1 receiver", one),
                         (f"r{round_}: {agents} agents, 2 receivers ($share)", two)]
                ratios.append(two["files_per_s"] / one["files_per_s"])
            _print_runs(f"store {store} ({'committed + transfers in SeaweedFS' if store == 's3' else 'local disk'}), "
                        f"{where}: {agents} agents x {files} files of {kib} KiB; ratio = files/s against the first "
                        f"row", runs, runs[0][1])
            print(f"two receivers / one, per round: {', '.join(f'{r:.2f}x' for r in ratios)}; "
                  f"median {statistics.median(ratios):.2f}x")
            if profile is not None:
                print(f"where one receiver spent its samples ({profile.with_suffix(f'.{store}.txt')}):")
                for where_, share in summarise_profile(profile.with_suffix(f".{store}.txt")):
                    print(f"  {share:6.1%}  {where_}")
            results[store] = dict(runs)
            if seaweed is not None:
                seaweed.stop()
    print(json.dumps(results))


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
    many.add_argument("--store", default="local,s3",
                      help="comma-separated: local (one shared store_dir), s3 (SeaweedFS: committed files and "
                           "transfers in buckets)")
    many.add_argument("--hosts", choices=("netns", "loopback"), default="netns",
                      help="netns: each receiver on a test host of its own (network namespace, veth link)")
    many.add_argument("--baseline", action="store_true",
                      help="first, one agent sending every file (capped by its share of the receiver's queue)")
    many.add_argument("--rounds", type=int, default=2, help="rounds of one receiver, then two (alternating)")
    many.add_argument("--keep", action="store_true", help="keep the work directory (logs of receivers, broker)")
    many.add_argument("--profile", type=Path, help="py-spy the one-receiver run; collapsed stacks to PATH.<store>.txt")
    args = parser.parse_args()
    if args.what == "catalog":
        bench_catalog(args.rows)
    else:
        bench_agents(args.agents, args.files, args.kib, args.processes, args.store.split(","), args.hosts,
                     args.baseline, args.profile, args.keep, args.rounds)


if __name__ == "__main__":
    main()
