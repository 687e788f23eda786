"""One owner of the data dir (issue 14, defect 6), with real `edge-agent` processes: a second `run` is refused
naming the first's pid, the kernel frees the data dir on kill -9, `import` while the daemon ingests a dock goes
through the daemon and deletes nothing of either, and the control socket survives hostile clients."""

from __future__ import annotations

import getpass
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from edge_agent.catalog import Catalog, State
from edge_agent.evidence.verify import verify_all
from edge_agent.layout import StoreLayout
from edge_agent.ops import control
from tests.evidence_support import growing_partial, large_file, offline_agent_config, sha256_of
from tests.helpers import make_recorder_volume, wait_for
from tests.test_crash_ingest import daemon

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
IDENTITY = {"DeviceID": "A123456", "PoliceID": "320102123"}
BIG = "DCIM/100/A123456_320102123_20261122090000.MP4"


def answering(layout: StoreLayout, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    """The daemon's `hello` once its control socket answers (it opens it after recovery)."""
    def hello() -> dict[str, object] | None:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return control.request(layout.control_socket, "hello", {})
        except control.ControlUnavailable:
            return None
    return wait_for(hello, timeout=60, what="the daemon's control socket")


def cli(config_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE_AGENT, "--config", str(config_path), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_second_run_is_refused_naming_the_owner_and_kill_9_frees_the_data_dir(tmp_path: Path) -> None:
    config_path, cfg = offline_agent_config(tmp_path)
    layout, log = StoreLayout(cfg.agent.data_dir), tmp_path / "daemon.log"
    with daemon(config_path, log) as first:
        assert answering(layout, first, log)["pid"] == first.pid

        second = cli(config_path, "run", timeout=120)   # TimeoutExpired: it ran beside the first

        assert second.returncode == 2, second.stdout + second.stderr
        assert f"owned by pid {first.pid}" in second.stderr
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    assert layout.control_socket.exists()        # the killed daemon's socket is left behind, and its lock file
    with daemon(config_path, log) as third:      # ... but the kernel released the lock itself
        assert answering(layout, third, log)["pid"] == third.pid
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert not layout.control_socket.exists()
    catalog = Catalog(cfg.catalog_path)
    try:
        assert verify_all(catalog, layout) == []
    finally:
        catalog.close()


def test_import_while_the_daemon_ingests_a_dock_goes_through_it_and_deletes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "dock-sim"
    config_path, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root)}])
    dock_volume = make_recorder_volume(root, "A123456", {}, identity=IDENTITY)
    large_file(dock_volume / BIG, 2 << 30)
    card = make_recorder_volume(tmp_path / "cards", "CARD01", {
        f"DCIM/ZFY0900_320102001_20261122{h:02d}0000.MP4": 50 << 20 for h in range(8, 12)})   # 200 MiB
    layout, log = StoreLayout(cfg.agent.data_dir), tmp_path / "daemon.log"
    with daemon(config_path, log) as proc:
        part = growing_partial(layout.staging)
        inode = part.stat().st_ino

        imported = cli(config_path, "--json", "import", str(card), "--device", "ZFY0900", "--reason", "handed in")

        assert imported.returncode == 0, imported.stdout + imported.stderr
        assert json.loads(imported.stdout)["sealed"] == 4
        wait_for(lambda: len(sealed(cfg.catalog_path)) == 5 or proc.poll() is not None or alarms(cfg.catalog_path),
                 timeout=240,
                 what="the dock's file and the card's four sealed")
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]

    catalog = Catalog(cfg.catalog_path)
    try:
        rows = catalog.files()
        assert len(rows) == 5 and all(r.state == State.SEALED for r in rows), [(r.original_path, r.state) for r in rows]
        big = next(r for r in rows if r.original_path == BIG)
        # The daemon's copy in flight when the import began was finished and renamed, never removed and redone.
        assert (layout.data_dir / (big.store_path or "")).stat().st_ino == inode
        for record in rows:
            source = (dock_volume if record.original_path == BIG else card) / record.original_path
            assert sha256_of(layout.data_dir / (record.store_path or "")) == sha256_of(source) == record.sha256
        assert alarms(cfg.catalog_path) == []
        started = catalog.query("SELECT actor, detail FROM audit WHERE action = 'import.started'")
        assert [r["actor"] for r in started] == [getpass.getuser()]
        assert '"via":"control socket"' in started[0]["detail"]
        assert verify_all(catalog, layout) == []
    finally:
        catalog.close()
    checked = cli(config_path, "audit", "verify")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def alarms(catalog_path: Path) -> list[str]:
    catalog = Catalog(catalog_path, readonly=True)
    try:
        return [r["kind"] for r in catalog.query("SELECT kind FROM alarms")]
    finally:
        catalog.close()


def sealed(catalog_path: Path) -> list[str]:
    catalog = Catalog(catalog_path, readonly=True)
    try:
        return [r.file_id for r in catalog.files(states=[State.SEALED])]
    finally:
        catalog.close()


def raw(path: Path, payload: bytes, *, close_after_send: bool = False) -> dict[str, object] | None:
    """Send `payload` as is; the daemon's one reply line, parsed (None if it closed without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))   # blocking: a full backlog waits (with a timeout set it would be EAGAIN)
        sock.settimeout(30)
        try:
            sock.sendall(payload)
        except BrokenPipeError:   # it stopped reading an oversized request: its answer is still there
            pass
        if close_after_send:
            return None
        line = sock.makefile("rb").readline()
    return json.loads(line) if line else None


def test_the_control_socket_refuses_hostile_requests_and_keeps_serving(tmp_path: Path) -> None:
    config_path, cfg = offline_agent_config(tmp_path)
    layout, log = StoreLayout(cfg.agent.data_dir), tmp_path / "daemon.log"
    card = make_recorder_volume(tmp_path / "cards", "CARD02", {"DCIM/ZFY0900_320102001_20261122080000.MP4": 4096})
    with daemon(config_path, log) as proc:
        answering(layout, proc, log)
        sock_path = layout.control_socket
        assert sock_path.stat().st_mode & 0o007 == 0
        hostile = {
            b"not json\n": "not a JSON request line",
            b"\xff\xfe\xfd\n": "not a JSON request line",
            b"[" * 60_000 + b"\n": "not a JSON request line",                  # nesting deep enough to recurse
            b"x" * (control.MAX_REQUEST + 10) + b"\n": "larger than",
            b"x" * (4 << 20): "larger than",                                  # 4 MiB, no newline
            b"[1, 2]\n": "a JSON object",
            b'{"op": 7}\n': "unknown op",
            b'{"op": "rm -rf"}\n': "unknown op",
            b'{"op": "import", "args": []}\n': "args must be a JSON object",
            b'{"op": "import", "args": {}}\n': "'path'",
            b'{"op": "import", "args": {"path": "card", "device_id": "D"}}\n': "not absolute",
            b'{"op": "import", "args": {"path": "/x", "device_id": {"a": 1}}}\n': "'device_id'",
            json.dumps({"op": "import", "args": {"path": str(layout.keys), "device_id": "D"}}).encode() + b"\n":
                "inside the data dir",
            json.dumps({"op": "import", "args": {"path": str(tmp_path / "nowhere"), "device_id": "D"}}).encode()
            + b"\n": "sees no folder",
        }
        for payload, message in hostile.items():
            reply = raw(sock_path, payload)
            assert reply is not None and reply["ok"] is False and message in str(reply["error"]), (payload[:40], reply)
        raw(sock_path, b'{"op": "hel', close_after_send=True)                  # half a request, then gone
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(control.MAX_CONNECTIONS)]
        for sock in idle:
            sock.connect(str(sock_path))
        wait_for(lambda: "busy" in str((raw(sock_path, b'{"op": "hello"}\n') or {}).get("error")), timeout=30,
                 what="a request beyond the connection cap told busy")
        for sock in idle:
            sock.close()
        wait_for(lambda: (raw(sock_path, b'{"op": "hello"}\n') or {}).get("ok") is True, timeout=30,
                 what="the cap's slots back once the idle clients left")

        imported = cli(config_path, "import", str(card), "--device", "ZFY0900")

        assert imported.returncode == 0, imported.stdout + imported.stderr
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert len(sealed(cfg.catalog_path)) == 1


def test_import_refused_with_exit_2_while_another_process_owns_the_data_dir_without_a_socket(tmp_path: Path) -> None:
    config_path, cfg = offline_agent_config(tmp_path)
    layout = StoreLayout(cfg.agent.data_dir).open()
    card = make_recorder_volume(tmp_path / "cards", "CARD03", {"DCIM/ZFY0900_320102001_20261122080000.MP4": 4096})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from edge_agent.layout import StoreLayout, "
         "DataDirLock; lock = DataDirLock.acquire(StoreLayout(Path(sys.argv[1])), command='import'); "
         "print('held', flush=True); sys.stdin.read()", str(layout.data_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"

        refused = cli(config_path, "import", str(card), "--device", "ZFY0900")

        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"owned by pid {holder.pid} (edge-agent import)" in refused.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not cfg.catalog_path.exists() or sealed(cfg.catalog_path) == []
    done = cli(config_path, "import", str(card), "--device", "ZFY0900")
    assert done.returncode == 0, done.stdout + done.stderr
