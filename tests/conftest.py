from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.evidence.manifest import AgentKey
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import AGENT_ID

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh real broker per test, on its own loopback port."""
    if not (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        pytest.fail("mosquitto is not installed: run .ci/run or apt-get install mosquitto")
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[AgentKey, Path]:
    """The test agent's signing key, and a receiver's keys dir with its public key enrolled."""
    key = AgentKey.load_or_create(tmp_path / "agent-keys")
    keys_dir = tmp_path / "enrolled"
    keys_dir.mkdir()
    (keys_dir / f"{AGENT_ID}.pem").write_text(key.public_pem())
    return key, keys_dir
