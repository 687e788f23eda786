from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh real broker per test, on its own loopback port."""
    if not (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        pytest.fail("mosquitto is not installed: run .ci/run or apt-get install mosquitto")
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()
