"""The README's first command: the demo runs end to end and checks its own result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_and_passes_its_own_checks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--recorders", "2", "--clips", "2",
         "--clip-seconds", "4", "--workdir", str(tmp_path / "demo"), "--timeout", "180"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo passed" in result.stdout
    assert "byte-identical at the receiver" in result.stdout
    # The recorders were cleared only after the receiver confirmed them, and the receiver holds every file.
    assert not list((tmp_path / "demo" / "dock").rglob("*.MP4"))
    assert len(list((tmp_path / "demo" / "receiver-store" / "index").rglob("*.json"))) >= 4


@pytest.mark.extended   # the default run has the demo on the local store and the S3 store's own tests
def test_demo_with_s3_stores_everything_in_a_locked_seaweedfs_bucket(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--s3", "--recorders", "1", "--clips", "2",
         "--clip-seconds", "4", "--workdir", str(tmp_path / "demo"), "--timeout", "180"],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo passed" in result.stdout and "s3://edge-evidence" in result.stdout
    assert "receiver fsck of the bucket" in result.stdout
    # Nothing committed on the receiver's disk: the bucket holds it.
    assert not list((tmp_path / "demo" / "receiver-store" / "index").rglob("*.json"))
