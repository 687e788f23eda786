"""systemd: the units pass `systemd-analyze verify`, the agent's sandbox exposure is at most 2.5, tmpfiles make the
data dir private, and the real daemon speaks sd_notify (READY=1, WATCHDOG=1, STOPPING=1)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_receiver_config
from tests.helpers import agent_config

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("edge-agent.service", "edge-agent-receiver.service", "edge-agent-fleet.service")
INSTALLED_EXEC = "/opt/edge-agent/venv/bin/edge-agent"
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze is missing: run scripts/setup.sh (installs the systemd package)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    # The unit runs the installed command; here the venv's own edge-agent stands in at that path.
    text = (ROOT / "systemd" / unit).read_text()
    assert INSTALLED_EXEC in text
    checked = tmp_path / unit
    checked.write_text(text.replace(INSTALLED_EXEC, EDGE_AGENT))

    result = analyze("verify", str(checked))

    assert result.returncode == 0, result.stdout + result.stderr
    assert unit not in result.stderr, result.stderr


def test_agent_unit_is_hardened_to_exposure_at_most_2_5() -> None:
    result = analyze("security", "--offline=true", str(ROOT / "systemd" / "edge-agent.service"))
    found = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.5
    unit = (ROOT / "systemd" / "edge-agent.service").read_text()
    for line in ("Type=notify", "User=edge-agent", "ProtectSystem=strict", "ReadWritePaths=/var/lib/edge-agent",
                 "NoNewPrivileges=yes", "CapabilityBoundingSet=\n", "WatchdogSec="):
        assert line in unit, line
    assert "\nProcSubset=pid" not in unit   # it would hide /proc/net/tcp from the cameras' stall watch


def test_tmpfiles_make_the_data_dir_and_keys_private(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nedge-agent:x:990:990::/var/lib/edge-agent:"
                                         "/usr/sbin/nologin\n")
    (root / "etc" / "group").write_text("root:x:0:\nedge-agent:x:990:\n")

    result = subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}",
                             str(ROOT / "systemd" / "edge-agent.tmpfiles")], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    data, keys = root / "var/lib/edge-agent", root / "var/lib/edge-agent/keys"
    assert (data.stat().st_mode & 0o777, data.stat().st_uid) == (0o750, 990)
    assert (keys.stat().st_mode & 0o777, keys.stat().st_uid) == (0o700, 990)
    assert (root / "etc/edge-agent").stat().st_gid == 990


def test_example_configs_that_install_sh_installs_are_valid() -> None:
    result = subprocess.run([EDGE_AGENT, "config", "check", str(ROOT / "config" / "agent.example.toml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    receiver = load_receiver_config(ROOT / "config" / "receiver.example.toml")
    assert receiver.receiver.keys_dir == Path("/etc/edge-receiver/agents")
    install = (ROOT / "scripts" / "install.sh").read_text()
    for installed in ("config/agent.example.toml", "config/receiver.example.toml", "systemd/edge-agent.service",
                      "systemd/edge-agent-receiver.service", "systemd/edge-agent.tmpfiles",
                      "config/fleet.example.toml", "systemd/edge-agent-fleet.service"):
        assert installed in install and (ROOT / installed).exists(), installed


def test_daemon_notifies_ready_pings_the_watchdog_and_says_stopping(tmp_path: Path) -> None:
    cfg_path, _ = agent_config(tmp_path, health={"interval_s": 3600})
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([EDGE_AGENT, "--config", str(cfg_path), "run"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    messages: list[str] = []
    try:
        while sum(m == "WATCHDOG=1" for m in messages) < 3:
            messages.append(sock.recv(4096).decode())
        assert messages[0].startswith("READY=1"), messages
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.append(sock.recv(4096).decode())
        assert proc.wait(30) == 0
        assert not [m for m in messages if m.startswith("ERRNO=")], messages  # tools we run do not speak for us
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
