"""End to end: docked recorder -> real agent process -> real mosquitto -> real receiver process -> ack.

These prove G1 (nothing lost, byte-identical), G2 (never cleared early) and G3 (one copy centrally)
across a broker restart and kill -9 of the agent and of the receiver.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.evidence_support import sha256_of
from tests.helpers import make_recorder_volume, wait_for
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import (
    CLI,
    agent_proc,
    agent_setup,
    catalog_rows,
    enrol,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    states,
    stored_index,
)

SETTLED = ("synced", "source_cleared")


def mixed_sizes(n: int, rng: random.Random) -> list[int]:
    """0 B, 1 B, chunk edges, small, medium, 20 MB and one 300 MB file."""
    fixed = [0, 1, 262143, 262144, 262145, 524288, 20_000_000, 300_000_000]
    return fixed + [rng.choice([rng.randint(2, 4096), rng.randint(4096, 600_000), rng.randint(600_000, 4_000_000)])
                    for _ in range(n - len(fixed))]


class ClearWatch(threading.Thread):
    """Watches a recorder volume: each file that disappears must already be stored by the receiver (G2)."""

    def __init__(self, volume: Path, store: Path, expected: dict[str, str]):
        super().__init__(daemon=True)
        self.volume, self.store, self.expected = volume, store, expected
        self.violations: list[str] = []
        self.cleared: set[str] = set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.01):
            self._scan()

    def _scan(self) -> None:
        for relative, sha in self.expected.items():
            if relative in self.cleared or (self.volume / relative).exists():
                continue
            self.cleared.add(relative)
            if not (self.store / "objects" / sha[:2] / sha).exists():
                self.violations.append(f"{relative} deleted before the receiver stored it")

    def stop(self) -> None:
        """Stop watching, after a last look: under load the thread may not have run since the last deletions
        (the files were cleared, the catalog says so, but this watch never polled again)."""
        self._done.set()
        self.join(5)
        self._scan()


def start_pair(tmp_path: Path, port: int, dock: Path, **agent_mqtt) -> tuple:
    agent_toml, data_dir = agent_setup(tmp_path, port, dock_root=dock, mqtt=agent_mqtt)
    enrol(agent_toml, tmp_path / "enrolled")
    store = tmp_path / "store"
    receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, port, store, tmp_path / "enrolled")).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = agent_proc(tmp_path, agent_toml).start()
    return agent_toml, data_dir, store, agent, receiver


def assert_stored_once_and_identical(data_dir: Path, store: Path, originals: dict[str, str]) -> None:
    rows = catalog_rows(data_dir)
    index = stored_index(store)
    assert sorted(index) == sorted(r[0] for r in rows)          # every file, each stored once
    by_path = {r[2]: r for r in rows}
    for relative, sha in originals.items():
        file_id, _state, _path, catalog_sha = by_path[relative]
        assert catalog_sha == sha
        entry = index[file_id]
        assert entry["sha256"] == sha
        assert sha256_of(store / entry["object"]) == sha     # byte-identical
    objects = [p for p in (store / "objects").rglob("*") if p.is_file() and not p.name.endswith(".json")]
    assert len(objects) == len(set(originals.values()))          # identical contents share one object
    synced_once = dict(catalog_rows(data_dir, "SELECT subject, COUNT(*) FROM audit WHERE action = 'file.synced'"
                                              " GROUP BY subject"))
    assert synced_once == {r[0]: 1 for r in rows}


@pytest.mark.slow

def settle_then_stop(data_dir: Path, count: int, timeout: float, agent, receiver, sniffer) -> None:  # noqa: ANN001
    """Wait until `count` files are settled on the agent, then stop the agent, the receiver and the sniffer."""
    try:
        wait_for(lambda: sum(states(data_dir).get(s, 0) for s in SETTLED) == count, timeout,
                 what=f"{count} files synced, have {states(data_dir)}")
    finally:
        assert agent.stop() == 0
        assert receiver.stop() == 0
        sniffer.disconnect()
        sniffer.loop_stop()


def test_fifty_files_arrive_byte_identical_across_a_broker_restart_and_are_cleared_only_after_their_ack(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = random.Random(3)
    dock = tmp_path / "dock"
    files = {f"DCIM/100/REC{i:04d}.MP4": size for i, size in enumerate(mixed_sizes(50, rng))}
    prepared = make_recorder_volume(dock / ".prep", "VOL1", files)   # hidden: not docked yet
    originals = {rel: sha256_of(prepared / rel) for rel in files}
    _toml, data_dir, store, agent, receiver = start_pair(tmp_path, mosquitto.port, dock)
    volume = dock / "VOL1"
    os.rename(prepared, volume)                          # docked whole, as a vendor drop folder is
    watch = ClearWatch(volume, store, originals)
    watch.start()
    try:
        wait_for(lambda: sum(states(data_dir).get(s, 0) for s in SETTLED) >= 10, 60, what="10 files synced")
        mosquitto.restart()                               # mid-transfer: sessions and queues are gone
        wait_for(lambda: states(data_dir).get("source_cleared", 0) == len(files), 120,
                 what=f"all {len(files)} files synced and cleared, have {states(data_dir)}")
    finally:
        watch.stop()
        assert agent.stop() == 0
        assert receiver.stop() == 0
    assert watch.violations == []
    assert watch.cleared == set(files)
    assert_stored_once_and_identical(data_dir, store, originals)


@pytest.mark.slow
def test_kill_9_of_agent_and_receiver_mid_transfer_still_syncs_every_file_exactly_once(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    rng = random.Random(9)
    dock = tmp_path / "dock"
    files = {f"DCIM/REC{i:04d}.MP4": size
             for i, size in enumerate([0, 5, 300_000, *[rng.randint(1, 3_000_000) for _ in range(12)],
                                       25_000_000, 25_000_000])}
    make_recorder_volume(dock, "VOL1", files)
    originals = {rel: sha256_of(dock / "VOL1" / rel) for rel in files}
    _toml, data_dir, store, agent, receiver = start_pair(tmp_path, mosquitto.port, dock,
                                                         bandwidth_kbps=100_000)   # 12.5 MB/s: kills land mid-file
    try:
        for round_ in range(6):
            time.sleep(rng.uniform(0.3, 1.5))
            victim = agent if round_ % 2 == 0 else receiver
            victim.kill9()
            time.sleep(rng.uniform(0.0, 0.5))
            victim.start()
        wait_for(lambda: sum(states(data_dir).get(s, 0) for s in SETTLED) == len(files), 120,
                 what=f"all files synced, have {states(data_dir)}")
    finally:
        assert agent.stop() == 0
        assert receiver.stop() == 0
    assert_stored_once_and_identical(data_dir, store, originals)
    assert not any((store / "incoming").rglob("data"))   # no transfer left half done


def test_altered_file_and_forged_manifest_are_rejected_and_the_recorder_keeps_its_files(
        tmp_path: Path) -> None:
    """Tamper with the agent's sealed copy and manifest while the broker is down; the receiver must refuse
    both, the agent must raise alarms and delete nothing; the untouched file goes through and is cleared."""
    broker = Mosquitto(tmp_path / "broker")
    dock = tmp_path / "dock"
    files = {"DCIM/A.MP4": 700_000, "DCIM/B.MP4": 20_000, "DCIM/C.MP4": 50_000}
    volume = make_recorder_volume(dock, "VOL1", files)
    agent_toml, data_dir = agent_setup(tmp_path, broker.port, dock_root=dock)
    enrol(agent_toml, tmp_path / "enrolled")
    agent = agent_proc(tmp_path, agent_toml).start()
    receiver = None
    try:
        wait_for(lambda: states(data_dir).get("sealed", 0) == 3, 60, what="3 files sealed")
        rows = {r[2]: r for r in catalog_rows(data_dir, "SELECT file_id, store_path, original_path FROM files")}
        stored = data_dir / rows["DCIM/A.MP4"][1]
        os.chmod(stored, 0o644)
        with open(stored, "r+b") as f:                    # one byte changed in the sealed copy
            f.seek(123_456)
            byte = f.read(1)
            f.seek(123_456)
            f.write(bytes([byte[0] ^ 0x01]))
        b_id = rows["DCIM/B.MP4"][0]
        manifest = data_dir / "manifests" / b_id[-2:] / f"{b_id}.json"
        doc = json.loads(manifest.read_bytes())
        doc["officer_id"] = "forged-officer"               # signature left as it was
        os.chmod(manifest, 0o644)
        manifest.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
        broker.start()
        receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, broker.port, tmp_path / "store",
                                                          tmp_path / "enrolled")).start()
        wait_for(lambda: states(data_dir).get("rejected", 0) == 2 and states(data_dir).get("source_cleared") == 1,
                 60, what=f"2 rejected and 1 cleared, have {states(data_dir)}")
        errors = dict(catalog_rows(data_dir, "SELECT original_path, last_error FROM files WHERE state = 'rejected'"))
        assert "altered" in errors["DCIM/A.MP4"]
        assert "signature" in errors["DCIM/B.MP4"]
        alarms = catalog_rows(data_dir, "SELECT kind, subject FROM alarms WHERE cleared_ms IS NULL")
        assert sorted(s for k, s in alarms if k == "sync_rejected") == sorted([rows["DCIM/A.MP4"][0], b_id])
        assert (volume / "DCIM/A.MP4").exists() and (volume / "DCIM/B.MP4").exists()
        assert not (volume / "DCIM/C.MP4").exists()
        assert sorted(stored_index(tmp_path / "store")) == [rows["DCIM/C.MP4"][0]]
        # A custodian retries the rejected files: audited, and they are sent again (and refused again).
        out = subprocess.run([*CLI, "--config", str(agent_toml), "--json", "sync", "now", "--retry-rejected",
                              "--reason", "checked the store"], capture_output=True, text=True, check=True)
        assert sorted(json.loads(out.stdout)["retried"]) == sorted([rows["DCIM/A.MP4"][0], b_id])
        audit = catalog_rows(data_dir, "SELECT action, reason FROM audit WHERE action = 'sync.now'")
        assert audit == [("sync.now", "checked the store")]
        wait_for(lambda: catalog_rows(
            data_dir, "SELECT COUNT(*) FROM audit WHERE action = 'file.rejected'")[0][0] == 4, 60,
            what="both rejected again")
        assert (volume / "DCIM/A.MP4").exists() and (volume / "DCIM/B.MP4").exists()
    finally:
        assert agent.stop() == 0
        if receiver is not None:
            assert receiver.stop() == 0
        broker.stop()


def test_the_agent_sends_sha256_chunks_until_an_ack_lists_crc32_then_crc32_chunks(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A receiver of this version lists `crc32` in its acks' `chunk_checks`: the agent starts with SHA-256 chunk
    headers (what every receiver takes) and sends CRC-32 ones once it heard that; both kinds are stored exactly."""
    from edge_agent.sync.sender import PREPARE_AHEAD
    from tests.sync_support import ROOT, subscribed_client

    kinds: list[str] = []
    lock = threading.Lock()

    def sniff(payload: bytes) -> None:
        (length,) = struct.unpack(">I", payload[:4])
        header = json.loads(payload[4:4 + length])
        with lock:
            kinds.append("crc32" if "crc32" in header else "sha256")

    sniffer = subscribed_client(mosquitto.port, "sniffer", f"{ROOT}/+/files/+/chunk", sniff)
    dock = tmp_path / "dock"
    files = {"DCIM/100/REC0001.MP4": 48_000_000, "DCIM/100/REC0002.MP4": 2_000_000}   # > the window
    prepared = make_recorder_volume(dock / ".prep", "VOL1", files)
    originals = {rel: sha256_of(prepared / rel) for rel in files}
    _toml, data_dir, store, agent, receiver = start_pair(tmp_path, mosquitto.port, dock)
    os.rename(prepared, dock / "VOL1")
    settle_then_stop(data_dir, len(files), 60, agent, receiver, sniffer)
    assert_stored_once_and_identical(data_dir, store, originals)
    with lock:
        assert kinds[0] == "sha256", kinds         # nothing heard from the receiver yet
        assert "crc32" in kinds, kinds             # then what its acks announced
        # after the switch, at most the chunks each file had framed ahead
        assert kinds[kinds.index("crc32"):].count("sha256") <= len(files) * PREPARE_AHEAD, kinds


def test_a_window_larger_than_the_receivers_share_of_its_queue_sends_every_chunk_once(
        tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A receiver drops an agent's messages beyond its share of its queue (`max_queued_mib_per_agent`): an agent
    whose window was larger lost chunks there and waited out its ack timeout for each loss, then sent them again
    (1 GiB took 18 s instead of 3 in bench_sync with a window of 256 against a 64 MiB share). The receiver's acks
    say its share and the agent keeps within it: nothing is dropped, every chunk goes over the wire once."""
    from tests.sync_support import ROOT, subscribed_client

    chunks: list[int] = []
    lock = threading.Lock()

    def sniff(payload: bytes) -> None:
        (length,) = struct.unpack(">I", payload[:4])
        with lock:
            chunks.append(json.loads(payload[4:4 + length])["seq"])

    sniffer = subscribed_client(mosquitto.port, "sniffer", f"{ROOT}/+/files/+/chunk", sniff)
    dock = tmp_path / "dock"
    files = {"DCIM/100/REC0001.MP4": 24_000_000, "DCIM/100/REC0002.MP4": 8_000_000}   # 367 and 123 chunks
    prepared = make_recorder_volume(dock / ".prep", "VOL1", files)
    originals = {rel: sha256_of(prepared / rel) for rel in files}
    # A window of 256 chunks of 64 KiB (16 MiB) against a receiver that queues 2 MiB of this agent's messages.
    agent_toml, data_dir = agent_setup(tmp_path, mosquitto.port, dock_root=dock,
                                       mqtt={"window": 256, "chunk_kib": 64, "ack_timeout_s": 2})
    enrol(agent_toml, tmp_path / "enrolled")
    store = tmp_path / "store"
    receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, mosquitto.port, store, tmp_path / "enrolled",
                                                      max_queued_mib_per_agent=2)).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = agent_proc(tmp_path, agent_toml).start()
    os.rename(prepared, dock / "VOL1")
    settle_then_stop(data_dir, len(files), 120, agent, receiver, sniffer)
    assert_stored_once_and_identical(data_dir, store, originals)
    agent_log = (tmp_path / "agent.log").read_text(errors="replace")
    assert not receiver_logged(tmp_path, "event=agent_flooding")   # nothing dropped over the agent's share
    assert "querying the receiver" not in agent_log                 # no ack timeout
    assert "the receiver queues at most" in agent_log               # the agent heard the share and kept within it
    total = sum(-(-size // 65536) for size in files.values())
    with lock:
        assert len(chunks) == total, f"{len(chunks)} chunk messages for {total} chunks"   # none sent twice
