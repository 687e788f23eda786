"""The receiver supervised (a real `edge-agent receiver run` process, a real mosquitto, an injected fault): a
thread that dies is started again and files still complete; a thread that is stuck makes the process exit
non-zero for systemd to restart it, and systemd's watchdog is fed only while every thread is live."""

from __future__ import annotations

import hashlib
import socket
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.evidence.manifest import AgentKey
from edge_agent.platform.receiver.supervise import EXIT_STUCK, FAULT_ENV, Loop, Supervisor, pulse
from edge_agent.protocol.heartbeat import Heartbeat
from tests.helpers import wait_for, write_toml
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import AGENT_ID, ScriptedAgent, random_bytes, receiver_logged, receiver_proc, receiver_setup


def supervised_receiver(tmp_path: Path, port: int, *, stall_s: float) -> tuple[Path, AgentKey]:
    key = AgentKey.load_or_create(tmp_path / "agent-keys")
    keys_dir = tmp_path / "enrolled"
    keys_dir.mkdir()
    (keys_dir / f"{AGENT_ID}.pem").write_text(key.public_pem())
    config = receiver_setup(tmp_path, port, tmp_path / "store", keys_dir)
    data = tomllib.loads(config.read_text())
    write_toml(config, {**data, "liveness": {"check_s": 0.2, "stall_s": stall_s}})
    return config, key


def a_file_completes(port: int, key: AgentKey) -> None:
    agent = ScriptedAgent(port, key)
    try:
        content = random_bytes(3 * 65536 + 5)
        doc = agent.send_file(content)
        assert agent.ack(doc["file_id"], "complete", timeout=30)["sha256"] == hashlib.sha256(content).hexdigest()
    finally:
        agent.close()


@pytest.mark.parametrize("thread", ["receiver-worker", "receiver-checker", "receiver-syncer"])
def test_a_receiver_thread_that_dies_is_started_again_and_files_still_complete(
        tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, thread: str) -> None:
    config, key = supervised_receiver(tmp_path, mosquitto.port, stall_s=60)
    monkeypatch.setenv(FAULT_ENV, f"{thread}:die")
    proc = receiver_proc(tmp_path, config).start()
    try:
        wait_for(lambda: receiver_logged(tmp_path, f"event=component_restarted component={thread}"), 20,
                 what=f"{thread} restarted")
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
        a_file_completes(mosquitto.port, key)
        assert proc.alive
    finally:
        assert proc.stop() == 0


def test_a_stuck_receiver_thread_exits_non_zero_and_the_watchdog_is_fed_only_while_all_are_live(
        tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch) -> None:
    config, key = supervised_receiver(tmp_path, mosquitto.port, stall_s=2)
    notify_path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(notify_path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv(FAULT_ENV, "receiver-syncer:hang")
    proc = receiver_proc(tmp_path, config).start()
    try:
        assert proc.popen is not None
        assert proc.popen.wait(30) == EXIT_STUCK
        assert receiver_logged(tmp_path, "event=component_stuck component=receiver-syncer")
        systemd.settimeout(1)
        said: list[str] = []
        while True:
            try:
                said.append(systemd.recv(4096).decode())
            except TimeoutError:
                break
        assert said[0].startswith("READY=1")
        stuck = said.index("STATUS=stuck: receiver-syncer")
        assert "WATCHDOG=1" in said[:stuck]            # fed while every thread was live
        assert "WATCHDOG=1" not in said[stuck:]        # and never after
    finally:
        systemd.close()
    monkeypatch.delenv(FAULT_ENV)
    monkeypatch.delenv("NOTIFY_SOCKET")
    proc.start()   # what systemd's Restart=on-failure does
    try:
        wait_for(lambda: proc.alive and receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver back")
        a_file_completes(mosquitto.port, key)
    finally:
        assert proc.stop() == 0


def test_a_long_step_that_reports_progress_is_not_taken_for_a_stuck_thread() -> None:
    """A commit re-reading a 64 GiB file after a restart takes minutes inside one step: it pulses, so the
    supervisor does not exit (and the restarted receiver redo the same step forever); a silent one is stuck."""
    stopping, release, exits = threading.Event(), threading.Event(), []

    def long_step(pulsing: bool) -> Callable[[Heartbeat], None]:
        def step(_heartbeat: Heartbeat) -> None:
            while not release.wait(0.01):
                if pulsing:
                    pulse()
        return step

    pulsing = Loop("receiver-syncer", long_step(True), stopping)
    silent = Loop("receiver-worker", long_step(False), stopping)
    pulsing.start()
    silent.start()
    try:
        supervisor = Supervisor(lambda: [pulsing.vital()], check_s=0.1, stall_s=1, exit_process=exits.append)
        watched_silent = Supervisor(lambda: [silent.vital()], check_s=0.1, stall_s=1, exit_process=exits.append)
        release.wait(2.5)   # longer than stall_s: the time a stuck thread needs to be seen as stuck
        assert supervisor.check() and exits == []
        assert not watched_silent.check() and exits == [EXIT_STUCK]
    finally:
        release.set()
        stopping.set()
