"""Secrets stay secret: the MQTT password and the agent's private key never appear in any log of a full run
(debug level, agent and receiver), and the agent refuses to start when its data, key or password file is
open to other users."""

from __future__ import annotations

import base64
import os
import random
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from edge_agent.layout import StoreLayout
from tests.faults.rig import EDGE_AGENT, Process, Rig, receiver_process, wait_drained
from tests.peers.mosquitto import Mosquitto

PASSWORD = "Pw-" + "7f3a9c1e5b2d4680"


def _password_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "mqtt.pass"
    path.write_text(PASSWORD + "\n")
    os.chmod(path, mode)
    return path


def test_a_full_run_at_debug_level_logs_neither_password_nor_key_material(tmp_path: Path,
                                                                          mosquitto: Mosquitto) -> None:
    password = _password_file(tmp_path)
    rig = Rig(tmp_path / "rig", mosquitto.port,
              mqtt_extra={"username": "ws-faults-01", "password_file": str(password)})
    agent = Process(["-v", "--config", str(rig.agent_config), "run"], rig.logs / "agent.log")
    receiver = receiver_process(rig)
    rig.add_files([300_000, 40_000], random.Random(6))
    receiver.start()
    agent.start()
    try:
        wait_drained(rig, timeout=120)
    finally:
        agent.terminate()
        receiver.terminate()
    pem = (StoreLayout(rig.data_dir).keys / "agent_ed25519.pem").read_bytes()
    private = serialization.load_pem_private_key(pem, None)
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    secrets = [PASSWORD, base64.b64encode(raw).decode(), raw.hex(),
               *[line for line in pem.decode().splitlines() if line and not line.startswith("-----")]]
    logs = {path.name: path.read_text(errors="replace") for path in rig.logs.iterdir()}
    assert "DEBUG" in logs["agent.log"] and "synced" in logs["agent.log"]   # the run did log, and in detail
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"{name} contains secret material"


def _start(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE_AGENT, "--config", str(config), "run"], capture_output=True, text=True, timeout=60)


def test_agent_refuses_to_start_with_data_key_or_password_open_to_others(tmp_path: Path,
                                                                         mosquitto: Mosquitto) -> None:
    password = _password_file(tmp_path)
    rig = Rig(tmp_path / "rig", mosquitto.port,
              mqtt_extra={"username": "ws-faults-01", "password_file": str(password)})
    key = StoreLayout(rig.data_dir).keys / "agent_ed25519.pem"

    os.chmod(rig.data_dir, 0o755)
    result = _start(rig.agent_config)
    assert result.returncode == 2 and "open to all users" in result.stderr and "chmod o-rwx" in result.stderr
    os.chmod(rig.data_dir, 0o750)

    os.chmod(key, 0o644)
    result = _start(rig.agent_config)
    assert result.returncode == 2 and "readable by others" in result.stderr and "chmod 600" in result.stderr
    os.chmod(key, 0o600)

    os.chmod(password, 0o644)
    result = _start(rig.agent_config)
    assert result.returncode == 2 and "mqtt.pass" in result.stderr and "chmod" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
