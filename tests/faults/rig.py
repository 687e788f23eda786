"""The fault rig: a real agent and a real receiver (processes or in-process) around a real mosquitto, a
recorder volume fed with files, and the checks of G1-G3 that every fault test ends with.

A recorder file is known to the rig by its name and SHA-256; the receiver's index says which SHA-256 it
holds for which agent file, so "deleted before a matching ack" is checked by watching the volume and asking
the receiver's store, independently of the agent's own catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog
from edge_agent.evidence.manifest import AgentKey
from edge_agent.layout import StoreLayout
from tests.helpers import wait_for, write_toml
from tests.sync_support import pin_receiver_key

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
AGENT_ID = "ws-faults-01"
DEVICE = "A123456"
OFFICER = "320102123"
MEDIA = ("DCIM/**/*",)
SEED_ENV = "FAULTS_SEED"


def seed() -> int:
    """The run's seed: FAULTS_SEED to replay a failure, else a fresh one (the tests print it)."""
    return int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))


def recorder_name(index: int) -> str:
    """A ZFY-GA-2016 file name: the recorder's device and officer, then a start time unique per index."""
    hh, rest = divmod(index, 3600)
    mm, ss = divmod(rest, 60)
    return f"DCIM/100/{DEVICE}_{OFFICER}_20261122{hh % 24:02d}{mm:02d}{ss:02d}.MP4"


@dataclass
class Rig:
    """Paths and configs of one agent + receiver pair on `broker_port`."""

    base: Path
    broker_port: int
    chunk_kib: int = 64
    agent_extra: dict[str, Any] = field(default_factory=dict)
    mqtt_extra: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)   # more agent.toml sections (retention, health)

    def __post_init__(self) -> None:
        self.dock_root = self.base / "dock"
        self.volume = self.dock_root / DEVICE
        self.parking = self.base / "parking"       # files are written here, then renamed in whole
        self.data_dir = self.base / "agent-data"
        self.store_dir = self.base / "receiver-store"
        self.keys_dir = self.base / "receiver-keys"
        self.pinned_keys = self.base / "pinned-receiver-keys"   # the agent's mqtt.receiver_keys
        self.logs = self.base / "logs"
        for path in (self.volume, self.parking, self.keys_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o750, exist_ok=True)
        (self.volume / "DEVICE.INI").write_text(f"DeviceID={DEVICE}\nPoliceID={OFFICER}\n")
        self.sources: dict[str, str] = {}   # original_path -> sha256 of every file put on the recorder
        self.sources_lock = threading.Lock()  # the test adds files while ClearWatch reads them
        self.next_index = 0
        pin_receiver_key(self.store_dir / "keys", self.pinned_keys, "receiver")   # before the agent starts
        self.write_configs(self.broker_port)
        key = AgentKey.load_or_create(StoreLayout(self.data_dir).keys)    # enrol the agent's key centrally
        (self.keys_dir / f"{AGENT_ID}.pem").write_text(key.public_pem())

    def write_configs(self, port: int, *, agent_port: int | None = None) -> None:
        mqtt = {"host": "127.0.0.1", "port": agent_port or port, "chunk_kib": self.chunk_kib, "window": 16,
                "ack_timeout_s": 2, "reconnect_min_s": 0.1, "reconnect_max_s": 1, "keepalive_s": 5,
                "receiver_keys": str(self.pinned_keys), **self.mqtt_extra}
        self.agent_config = write_toml(self.base / "agent.toml", {
            "agent": {"id": AGENT_ID, "site": "nj-gulou", "unit": "鼓楼区城管大队", "data_dir": str(self.data_dir),
                      "max_disk_gb": 50, "min_free_mb": 0, **self.agent_extra},
            "mqtt": mqtt,
            "docks": [{"name": "bench", "kind": "directory", "root": str(self.dock_root), "clear_after_sync": True,
                       "settle_s": 0.5, "rescan_s": 0.2}],
            **self.sections,
        })
        self.receiver_config = write_toml(self.base / "receiver.toml", {
            "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 1},
            "receiver": {"store_dir": str(self.store_dir), "keys_dir": str(self.keys_dir), "ack_interval_ms": 100},
        })

    # -- the recorder ---------------------------------------------------------------------------

    def add_files(self, sizes: list[int], rng: random.Random) -> list[str]:
        """Put files of `sizes` bytes on the recorder, each written aside and renamed in whole, aged."""
        names = []
        for size in sizes:
            name = recorder_name(self.next_index)
            self.next_index += 1
            aside = self.parking / Path(name).name
            digest = hashlib.sha256()
            with open(aside, "wb") as out:
                left = size
                while left:
                    block = rng.randbytes(min(left, 1 << 20))
                    digest.update(block)
                    out.write(block)
                    left -= len(block)
            past = time.time() - 120
            os.utime(aside, (past, past))
            target = self.volume / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.sources_lock:
                os.rename(aside, target)
                self.sources[name] = digest.hexdigest()
            names.append(name)
        return names

    def known(self) -> dict[str, str]:
        with self.sources_lock:
            return dict(self.sources)

    def on_recorder(self, known: dict[str, str] | None = None) -> set[str]:
        return {name for name in (known if known is not None else self.known()) if (self.volume / name).exists()}

    # -- the receiver's store -------------------------------------------------------------------

    def receiver_index(self) -> dict[str, dict[str, Any]]:
        """file_id -> index entry of every file the receiver stored for this agent."""
        out = {}
        directory = self.store_dir / "index" / AGENT_ID
        for path in directory.glob("*.json") if directory.exists() else []:
            try:
                out[path.stem] = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue   # being written right now (atomic rename pending): read next time
        return out

    def stored_sha256s(self) -> set[str]:
        return {entry["sha256"] for entry in self.receiver_index().values()}

    # -- the agent's catalog --------------------------------------------------------------------

    def catalog_rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        path = self.data_dir / "catalog.sqlite"
        if not path.exists():
            return []
        catalog = Catalog(path, readonly=True)
        try:
            return catalog.query(sql, params)
        except sqlite3.OperationalError:
            return []   # the agent is creating its catalog right now
        finally:
            catalog.close()

    def count(self, states: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(states))
        rows = self.catalog_rows(f"SELECT COUNT(*) FROM files WHERE state IN ({marks})", states)
        return int(rows[0][0]) if rows else 0

    def agent_log(self) -> str:
        path = self.logs / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_cleared(self) -> bool:
        """Every recorder file confirmed and deleted from the recorder (the row may be purged locally since)."""
        rows = self.catalog_rows("SELECT COUNT(*) FROM files WHERE cleared_ms IS NOT NULL AND synced_ms IS NOT NULL")
        return not self.on_recorder() and bool(rows) and rows[0][0] == len(self.sources)

    # -- the end checks (G1, G2 is watched live by ClearWatch, G3, G4 on the chains) ----------------

    def check_delivered(self) -> None:
        index = self.receiver_index()
        by_sha: dict[str, list[str]] = {}
        for file_id, entry in index.items():
            by_sha.setdefault(entry["sha256"], []).append(file_id)
        missing = sorted(n for n, sha in self.sources.items() if sha not in by_sha)
        assert not missing, f"G1: {len(missing)} recorder files never reached the receiver: {missing[:5]}"
        twice = {sha: ids for sha, ids in by_sha.items() if len(ids) > 1}
        assert not twice, f"G3: stored under more than one file id: {twice}"
        assert len(index) == len(self.sources), f"receiver holds {len(index)} files, recorder had {len(self.sources)}"
        objects = [p for p in (self.store_dir / "objects").rglob("*") if p.is_file() and "." not in p.name]
        assert len(objects) == len(self.sources), f"G3: {len(objects)} objects for {len(self.sources)} files"
        for path in objects:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            assert digest.hexdigest() == path.name, f"object {path} does not hash to its name"
        rows = self.catalog_rows("SELECT original_path, sha256, state, cleared_ms FROM files")
        assert len(rows) == len(self.sources), f"G3: the catalog has {len(rows)} rows for {len(self.sources)} files"
        for row in rows:
            assert row["sha256"] == self.sources[row["original_path"]], dict(row)
            assert row["state"] in ("source_cleared", "purged") and row["cleared_ms"], dict(row)

    def check_chains(self) -> None:
        for args in (["verify"], ["audit", "verify"]):
            result = subprocess.run([EDGE_AGENT, "--config", str(self.agent_config), "--json", *args],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"edge-agent {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


class ClearWatch(threading.Thread):
    """Watches the recorder: every file that disappears must already be stored by the receiver with the
    same SHA-256 (G2). Runs until `stop()`; `violations` lists any file cleared too early."""

    def __init__(self, rig: Rig):
        super().__init__(name="clear-watch", daemon=True)
        self.rig = rig
        self.violations: list[str] = []
        self.cleared: set[str] = set()
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                self.sweep()
                self._stop_event.wait(0.01)
        except BaseException as exc:  # handed to the test by stop(): a dead watch must fail the test
            self.error = exc

    def sweep(self) -> None:
        known = self.rig.known()
        gone = set(known) - self.rig.on_recorder(known) - self.cleared
        if not gone:
            return
        stored = self.rig.stored_sha256s()
        for name in gone:
            self.cleared.add(name)
            if known[name] not in stored:
                self.violations.append(name)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
        if self.error is not None:
            raise AssertionError(f"the G2 watch stopped early: {self.error!r}") from self.error
        self.sweep()


class Process:
    """One `edge-agent` process (agent or receiver) that a test may kill -9 and start again."""

    def __init__(self, args: list[str], log: Path):
        self.args = args
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([EDGE_AGENT, *self.args], stdout=out, stderr=out)
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_process(rig: Rig) -> Process:
    return Process(["--config", str(rig.agent_config), "run"], rig.logs / "agent.log")


def receiver_process(rig: Rig) -> Process:
    return Process(["receiver", "run", "--config", str(rig.receiver_config)], rig.logs / "receiver.log")


def wait_drained(rig: Rig, timeout: float) -> None:
    try:
        wait_for(rig.all_cleared, timeout=timeout, interval=0.1,
                 what=f"all {len(rig.sources)} files synced and cleared from the recorder")
    except TimeoutError as exc:
        rows = rig.catalog_rows("SELECT state, COUNT(*) AS n, SUM(cleared_ms IS NULL) AS on_recorder FROM files"
                                " GROUP BY state")
        alarms = rig.catalog_rows("SELECT kind, message FROM alarms WHERE cleared_ms IS NULL")
        usage = shutil.disk_usage(rig.data_dir)
        stored = {p.relative_to(rig.data_dir).as_posix(): p.stat().st_size
                  for p in rig.data_dir.rglob("*") if p.is_file()}
        raise AssertionError(
            f"{exc}; states: {[dict(r) for r in rows]}; alarms: {[dict(a) for a in alarms]}; "
            f"on the recorder: {len(rig.on_recorder())}; data_dir free {usage.free} of {usage.total}; "
            f"files: {sorted(stored.items(), key=lambda kv: -kv[1])[:8]}") from exc
