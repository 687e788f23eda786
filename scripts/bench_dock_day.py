#!/usr/bin/env python3
"""A dock day, end to end: many recorders docked at once while the uplink drains (docs/BENCHMARKS.md, "## Dock day").

Real processes in one run: `edge-agent run` (directory dock, `clear_after_sync`, the status page on a free
loopback port), one mosquitto, `edge-agent receiver run`. Three phases, each on the same recorders (the
volumes are written again after a phase clears them):

  ingest alone   the uplink's broker is down: from docking every recorder to every bay 可取走 (safe to take)
                 on the status page (`/api/board`: every bay `safe_to_take`: its files copied, read back,
                 hashed, signed and in the catalog)
  sync alone     the same agent restarted with the broker and receiver up, the recorders still docked: from
                 its `online` status to every file `source_cleared` (sent, verified and stored by the
                 receiver, receipt checked, original re-hashed and deleted from the recorder)
  dock day       a fresh agent with broker and receiver up: from docking every recorder to every bay 可取走,
                 and to every recorder cleared

`--yield-to-docks-kbps A B ...` runs one dock day per value (the uplink's cap while a bay collects; 0 holds),
each after that one on a fresh agent, and each after the first preceded by an ingest alone of its own (the
officers' wait is compared with the ingest of a minute before: the load of a shared machine moves within minutes).

The lower bound for the dock day is max(ingest alone, sync alone): the two can at best overlap entirely.
Goal: dock day to every recorder cleared <= 1.15x that bound. Also prints CPU-seconds per GiB end to end
(agent + receiver + broker, user + system) for the dock day, and for the two phases alone added up.

    .venv/bin/python scripts/bench_dock_day.py [--recorders 20] [--size-mib 512] [--files 4] [--dir /var/tmp]
        [--yield-to-docks-s 600] [--yield-to-docks-kbps 100000 0 ...]

The full size (20 recorders x 512 MiB = 10 GiB) needs about 3.3x that in free disk (the recorders, the
agent's copies, the receiver's store); with less, the recorders' size is scaled down and a note says so.
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
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_ingest import make_dock  # noqa: E402

from tests.helpers import write_toml  # noqa: E402
from tests.peers.mosquitto import Mosquitto, free_port  # noqa: E402
from tests.sync_support import pin_receiver_key  # noqa: E402

PY = sys.executable
AGENT_ID = "dock-bench-01"
MIB = 1 << 20
GIB = 1 << 30
DISK_FACTOR = 3.3     # recorders + the agent's sealed copies + the receiver's store, with room to spare
TIMEOUT_S = 3600


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "edge_agent.cli", *args], check=True, capture_output=True, text=True)


@dataclass
class Site:
    """One phase's agent, receiver and broker, in `work`."""

    work: Path
    mqtt_port: int
    yield_s: float | None = None     # mqtt.yield_to_docks_s; None: the agent's default
    yield_kbps: int | None = None    # mqtt.yield_to_docks_kbps; None: the agent's default
    ui_port: int = field(default_factory=free_port)
    procs: dict[str, psutil.Popen] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    logs: list = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.work / "agent-data"

    @property
    def store(self) -> Path:
        return self.work / "received"

    @property
    def dock_root(self) -> Path:
        return self.work / "dock"

    def configure(self) -> None:
        self.data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.dock_root.mkdir(exist_ok=True)
        pinned = self.work / "pinned"
        pin_receiver_key(self.store / "keys", pinned, "receiver")
        write_toml(self.work / "agent.toml", {
            "agent": {"id": AGENT_ID, "site": "bench", "unit": "bench", "data_dir": str(self.data_dir),
                      "max_disk_gb": 1000, "min_free_mb": 0},
            "mqtt": {"port": self.mqtt_port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2,
                     "receiver_keys": str(pinned),
                     **({"yield_to_docks_s": self.yield_s} if self.yield_s is not None else {}),
                     **({"yield_to_docks_kbps": self.yield_kbps} if self.yield_kbps is not None else {})},
            "ui": {"enabled": True, "listen": f"127.0.0.1:{self.ui_port}"},
            "docks": [{"name": "bench", "kind": "directory", "root": str(self.dock_root), "settle_s": 0,
                       "rescan_s": 0.2, "clear_after_sync": True}]})
        write_toml(self.work / "receiver.toml", {
            "mqtt": {"port": self.mqtt_port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2},
            "receiver": {"store_dir": str(self.store), "keys_dir": str(self.work / "agent-keys")}})

    def enrol(self) -> None:
        """The agent's public key into the receiver's keys dir (`keys show` makes the key if new)."""
        keys = json.loads(cli("--config", str(self.work / "agent.toml"), "--json", "keys", "show").stdout)
        (self.work / "agent-keys").mkdir(exist_ok=True)
        (self.work / "agent-keys" / f"{AGENT_ID}.pem").write_text(keys["public_key_pem"])

    def spawn(self, name: str, args: list[str]) -> None:
        log = open(self.work / f"{name}.log", "ab")
        self.logs.append(log)
        self.procs[name] = psutil.Popen([PY, "-m", "edge_agent.cli", *args], stdout=log, stderr=log)

    def start_agent(self) -> None:
        self.spawn("agent", ["--config", str(self.work / "agent.toml"), "run"])
        deadline = time.monotonic() + 120
        while self.board() is None:
            self.check()
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent's status page did not answer; see {self.work / 'agent.log'}")
            time.sleep(0.1)

    def start_uplink(self) -> Mosquitto:
        broker = Mosquitto(self.work / "broker", port=self.mqtt_port).start()
        self.procs["broker"] = psutil.Process(broker.proc.pid)
        self.spawn("receiver", ["receiver", "run", "--config", str(self.work / "receiver.toml")])
        wait_for_log(self.work / "receiver.log", "mqtt connected", self.check)
        return broker

    def check(self) -> None:
        for name, proc in self.procs.items():
            if name != "broker" and proc.poll() is not None:
                raise SystemExit(f"{name} exited ({proc.returncode}); see {self.work / (name + '.log')}")

    def board(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/api/board", timeout=10) as resp:
                return json.load(resp)
        except OSError:
            return None

    def all_safe(self, recorders: int) -> bool:
        got = self.board()
        bays = got["bays"] if got else []
        return len(bays) == recorders and all(b["safe_to_take"] for b in bays)

    def cpu_now(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                t = proc.cpu_times()
                out[name] = t.user + t.system
            except psutil.NoSuchProcess:
                out[name] = self.cpu.get(name, 0.0)
        return out

    def stop(self, broker: Mosquitto | None = None) -> None:
        self.cpu = self.cpu_now()
        for name in ("agent", "receiver"):
            if name in self.procs and self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        for name in ("agent", "receiver"):
            if name in self.procs:
                self.procs[name].wait(60)
        if broker is not None:
            broker.stop()
        for log in self.logs:
            log.close()
        self.procs, self.logs = {}, []


def wait_for_log(path: Path, text: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check()
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise SystemExit(f"{text!r} not in {path} after {timeout}s")


def states(data_dir: Path) -> dict[str, int]:
    try:
        conn = sqlite3.connect(f"file:{data_dir / 'catalog.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            return dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return {}


def watch_online(port: int) -> threading.Event:
    """Set when the agent publishes its `online` status."""
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


def until(done, site: Site, what: str, poll_s: float = 0.2) -> float:
    """Seconds (monotonic) at which `done()` first held."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        site.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not reached in {TIMEOUT_S} s: {states(site.data_dir)}; see {site.work}")
        time.sleep(poll_s)
    return time.monotonic()


def dock_all(parked: Path, dock_root: Path) -> float:
    t0 = time.monotonic()
    for volume in sorted(parked.iterdir()):
        os.rename(volume, dock_root / volume.name)     # every recorder docks at once
    return t0


def phases(work: Path, recorders: int, size: int, files: int, yield_s: float | None = None,
           yield_kbps: list[int | None] | tuple[int | None, ...] = (None,)) -> dict:
    port = free_port()
    parked = work / "recorders"
    n_files = recorders * files

    # 1. ingest alone: the broker is down.
    make_dock(parked, recorders, files, recorders * size)
    nbytes = sum(p.stat().st_size for p in parked.rglob("*.MP4"))
    first = Site(work / "alone", port)
    first.configure()
    first.start_agent()
    subprocess.run(["sync"], check=True)
    cpu0 = first.cpu_now()
    t0 = dock_all(parked, first.dock_root)
    ingest_s = until(lambda: first.all_safe(recorders), first, "every bay safe to take") - t0
    ingest_cpu = first.cpu_now()["agent"] - cpu0["agent"]
    first.stop()

    # 2. sync alone: the same agent, recorders still docked, broker and receiver up. A port free now (the one
    # picked minutes ago may have been taken by another process since).
    first.mqtt_port = port = free_port()
    first.configure()
    first.enrol()
    broker = first.start_uplink()
    online = watch_online(port)
    first.start_agent()
    if not online.wait(120):
        raise SystemExit(f"the agent did not come online; see {first.work / 'agent.log'}")
    t0 = time.monotonic()
    cpu0 = first.cpu_now()
    sync_s = until(lambda: states(first.data_dir).get("source_cleared", 0) == n_files, first,
                   "every file cleared") - t0
    first.stop(broker)
    sync_cpu = sum(first.cpu[k] - cpu0.get(k, 0.0) for k in first.cpu)
    shutil.rmtree(first.work)
    subprocess.run(["sync"], check=True)

    # 3. the dock day: both at once, on a fresh agent (once per setting asked for, each on fresh recorders).
    # After the first, each day has an ingest alone of its own just before it: on a machine shared with other
    # work the load moves within minutes, and the officers' wait compares best with an ingest a minute before.
    days = []
    gib = nbytes / GIB
    for n, kbps in enumerate(yield_kbps):
        adjacent = ingest_s if n == 0 else ingest_only(work, parked, recorders, size, files)
        day = dock_day(work, parked, recorders, size, files, yield_s, kbps)
        day["ingest_alone_before_s"] = round(adjacent, 2)
        day["ratio_cleared_vs_bound"] = round(day["dock_day_cleared_s"] / max(adjacent, sync_s), 3)
        day["ratio_safe_vs_ingest_alone"] = round(day["dock_day_safe_to_take_s"] / adjacent, 3)
        day["cpu_s_per_gib"] = round(sum(day.pop("cpu").values()) / gib, 2)
        days.append(day)
    bound = max(ingest_s, sync_s)
    first_day = days[0]
    return {
        "recorders": recorders, "files": n_files, "bytes": nbytes, "cores": os.cpu_count(),
        "ingest_alone_s": round(ingest_s, 2), "sync_alone_s": round(sync_s, 2), "lower_bound_s": round(bound, 2),
        "dock_day_safe_to_take_s": first_day["dock_day_safe_to_take_s"],
        "dock_day_cleared_s": first_day["dock_day_cleared_s"],
        "ratio_cleared_vs_bound": first_day["ratio_cleared_vs_bound"],
        "ratio_safe_vs_ingest_alone": first_day["ratio_safe_vs_ingest_alone"],
        "cpu_s_per_gib": {"dock_day": first_day["cpu_s_per_gib"],
                          "dock_day_by_process": first_day["cpu_s_per_gib_by_process"],
                          "ingest_alone_plus_sync_alone": round((ingest_cpu + sync_cpu) / gib, 2)},
        "days": days,
    }


def ingest_only(work: Path, parked: Path, recorders: int, size: int, files: int) -> float:
    """Ingest alone again (no broker) on fresh recorders: seconds from docking to every bay 可取走."""
    shutil.rmtree(parked, ignore_errors=True)
    make_dock(parked, recorders, files, recorders * size)
    site = Site(work / "again", free_port())
    site.configure()
    site.start_agent()
    subprocess.run(["sync"], check=True)
    t0 = dock_all(parked, site.dock_root)
    took = until(lambda: site.all_safe(recorders), site, "every bay safe to take") - t0
    site.stop()
    shutil.rmtree(site.work)
    subprocess.run(["sync"], check=True)
    return took


def dock_day(work: Path, parked: Path, recorders: int, size: int, files: int, yield_s: float | None,
             yield_kbps: int | None) -> dict:
    """One dock day: seconds to every bay 可取走 and to every recorder cleared, files cleared by then, CPU."""
    n_files = recorders * files
    shutil.rmtree(parked, ignore_errors=True)
    make_dock(parked, recorders, files, recorders * size)
    nbytes = sum(p.stat().st_size for p in parked.rglob("*.MP4"))
    port = free_port()
    day = Site(work / "day", port, yield_s, yield_kbps)
    day.configure()
    day.enrol()
    broker = day.start_uplink()
    online = watch_online(port)
    day.start_agent()
    if not online.wait(120):
        raise SystemExit(f"the agent did not come online; see {day.work / 'agent.log'}")
    subprocess.run(["sync"], check=True)
    load = os.getloadavg()[0]
    cpu0 = day.cpu_now()
    t0 = dock_all(parked, day.dock_root)
    safe_s = until(lambda: day.all_safe(recorders), day, "every bay safe to take") - t0
    at_safe = states(day.data_dir)
    cleared_s = until(lambda: states(day.data_dir).get("source_cleared", 0) == n_files, day,
                      "every file cleared") - t0
    day.stop(broker)
    day_cpu = {k: day.cpu[k] - cpu0.get(k, 0.0) for k in day.cpu}
    shutil.rmtree(day.work)
    subprocess.run(["sync"], check=True)
    return {"yield_to_docks_kbps": yield_kbps, "loadavg_1m_at_dock": round(load, 2),
            "dock_day_safe_to_take_s": round(safe_s, 2), "dock_day_cleared_s": round(cleared_s, 2),
            "cleared_when_safe": at_safe.get("source_cleared", 0),
            "synced_or_cleared_when_safe": at_safe.get("source_cleared", 0) + at_safe.get("synced", 0),
            "cpu": day_cpu, "cpu_s_per_gib_by_process": {k: round(v / (nbytes / GIB), 2) for k, v in day_cpu.items()}}


def fit_to_disk(where: Path, recorders: int, size_mib: int) -> tuple[int, str | None]:
    """The recorder size that fits the free disk (DISK_FACTOR x the total), and a note when scaled down."""
    free = shutil.disk_usage(where).free
    need = DISK_FACTOR * recorders * size_mib * MIB
    if need <= free:
        return size_mib, None
    fitted = int(free / DISK_FACTOR / recorders / MIB) // 4 * 4
    if fitted < 8:
        raise SystemExit(f"not enough free disk in {where} ({free / GIB:.1f} GiB) for {recorders} recorders; "
                         "free some space or pass --dir on a larger disk")
    return fitted, (f"note: {recorders} x {size_mib} MiB needs about {need / GIB:.1f} GiB free in {where}, "
                    f"there is {free / GIB:.1f} GiB: scaled down to {recorders} x {fitted} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recorders", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=512, help="bytes on each recorder (MiB)")
    parser.add_argument("--files", type=int, default=4, help="files on each recorder")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where to work (a real disk, not tmpfs)")
    parser.add_argument("--yield-to-docks-s", type=float, default=None,
                        help="the dock day's mqtt.yield_to_docks_s (0: ingest and upload side by side, as before "
                        "issue 15); default: the agent's")
    parser.add_argument("--yield-to-docks-kbps", type=int, nargs="+", default=[None],
                        help="the dock day's mqtt.yield_to_docks_kbps, the uplink's rate while a bay collects "
                        "(0: it holds its chunks); default: the agent's. Several values: one dock day each, in "
                        "this order, against the same sync-alone phase, each after an ingest alone of its own")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    size_mib, note = fit_to_disk(args.dir, args.recorders, args.size_mib)
    if note:
        print(note, flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-dock-day-", dir=args.dir))
    try:
        load = os.getloadavg()[0]
        result = phases(work, args.recorders, size_mib * MIB, args.files, args.yield_to_docks_s,
                        args.yield_to_docks_kbps)
        result["yield_to_docks_s"] = args.yield_to_docks_s
        result["yield_to_docks_kbps"] = args.yield_to_docks_kbps
        result["loadavg_1m_before"] = round(load, 2)
        result["scaled_down"] = note
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    cpu = result["cpu_s_per_gib"]
    def setting(value: object) -> str:
        return "default" if value is None else str(value)

    print(f"dock day (mqtt.yield_to_docks_s: {setting(args.yield_to_docks_s)}, yield_to_docks_kbps: "
          f"{setting(args.yield_to_docks_kbps[0])}): "
          f"{args.recorders} recorders x {size_mib} MiB ({result['bytes'] / GIB:.2f} GiB in "
          f"{result['files']} files), {result['cores']} cores, load {result['loadavg_1m_before']} before")
    print(f"ingest alone, dock -> every bay safe to take   {result['ingest_alone_s']:8.1f} s")
    print(f"sync alone, online -> every recorder cleared   {result['sync_alone_s']:8.1f} s")
    print(f"lower bound max(ingest alone, sync alone)      {result['lower_bound_s']:8.1f} s")
    print(f"dock day, dock -> every bay safe to take       {result['dock_day_safe_to_take_s']:8.1f} s "
          f"({result['ratio_safe_vs_ingest_alone']:.2f}x ingest alone)")
    print(f"dock day, dock -> every recorder cleared       {result['dock_day_cleared_s']:8.1f} s "
          f"({result['ratio_cleared_vs_bound']:.2f}x the bound; goal <= 1.15x: "
          f"{'met' if result['ratio_cleared_vs_bound'] <= 1.15 else 'NOT met'})")
    print(f"CPU-s per GiB end to end: dock day {cpu['dock_day']:.2f} "
          f"({', '.join(f'{k} {v:.2f}' for k, v in cpu['dock_day_by_process'].items())}); "
          f"ingest alone + sync alone {cpu['ingest_alone_plus_sync_alone']:.2f}")
    for day in result["days"][1:]:
        print(f"another dock day, yield_to_docks_kbps {setting(day['yield_to_docks_kbps'])} (load "
              f"{day['loadavg_1m_at_dock']}): safe to take {day['dock_day_safe_to_take_s']:.1f} s "
              f"({day['ratio_safe_vs_ingest_alone']:.2f}x the ingest alone just before, "
              f"{day['ingest_alone_before_s']:.1f} s), cleared {day['dock_day_cleared_s']:.1f} s "
              f"({day['ratio_cleared_vs_bound']:.2f}x the bound), CPU-s/GiB {day['cpu_s_per_gib']:.2f}")


if __name__ == "__main__":
    main()
