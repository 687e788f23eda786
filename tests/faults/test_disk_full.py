"""A full disk mid-copy, end to end: the agent's data_dir is a real 24 MiB tmpfs, the recorder holds twice
that, and the test fills the disk while a copy is under way. Intake pauses with an alarm, nothing
half-copied or half-sealed is kept, the recorder is untouched; when space returns intake resumes by
itself, retention frees confirmed files under disk pressure, and every file reaches the receiver before
the recorder is cleared (G1, G2, G5)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.evidence_support import growing_partial, sha256_of
from tests.faults.rig import ClearWatch, Rig, agent_process, receiver_process, seed, wait_drained
from tests.helpers import tmpfs, wait_for
from tests.peers.mosquitto import Mosquitto


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "agent-data", "24m") as data:
        yield data


def _fill(path: Path) -> None:
    """Write zeros into `path` until the filesystem is full (unbuffered: nothing is left to flush at close)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * (256 * 1024)
    try:
        while True:
            os.write(fd, block)
    except OSError:
        pass
    finally:
        os.close(fd)


def test_disk_filling_mid_copy_pauses_intake_keeps_nothing_half_done_then_drains(
        tmp_path: Path, small_disk: Path, mosquitto: Mosquitto) -> None:
    run_seed = seed()
    rng = random.Random(run_seed)
    print(f"disk-full seed={run_seed}")
    # Retention frees confirmed files under disk pressure: the recorder holds about twice the disk.
    rig = Rig(tmp_path, mosquitto.port, agent_extra={"min_free_mb": 1},
              sections={"retention": {"check_s": 0.5, "disk_purge_percent": 40}})
    assert rig.data_dir == small_disk
    rig.add_files([rng.randrange(5 << 20, 7 << 20) for _ in range(8)], rng)
    agent, receiver = agent_process(rig), receiver_process(rig)
    watch = ClearWatch(rig)
    watch.start()
    agent.start()
    ballast = rig.data_dir / "ballast"
    try:
        growing_partial(rig.data_dir / "staging")
        _fill(ballast)                          # the disk fills to the last byte while a copy is under way
        wait_for(lambda: "intake paused" in rig.agent_log(), timeout=60, what="intake paused on ENOSPC")
        # Some space back, less than a recording needs: the pause is now formal, with its alarm recorded.
        os.truncate(ballast, max(ballast.stat().st_size - (3 << 20), 0))
        wait_for(lambda: rig.catalog_rows("SELECT 1 FROM alarms WHERE kind = 'disk_full' AND cleared_ms IS NULL"),
                 timeout=60, what="the disk_full alarm")
        # Nothing half done: no partial copy kept, every file either waiting on the recorder or sealed whole.
        wait_for(lambda: not list((rig.data_dir / "staging").glob("*.part")), timeout=30, what="partial discarded")
        states = {r["state"] for r in rig.catalog_rows("SELECT state FROM files")}
        assert states <= {"discovered", "sealed", "sending"}, states
        for row in rig.catalog_rows("SELECT original_path, store_path FROM files WHERE state != 'discovered'"):
            assert sha256_of(rig.data_dir / row["store_path"]) == rig.sources[row["original_path"]]
        assert rig.on_recorder() == set(rig.sources)               # the recorder is untouched
        assert "Exception in thread" not in rig.agent_log()   # no worker died
        ballast.unlink()                       # space returns; the platform becomes reachable
        receiver.start()
        wait_drained(rig, timeout=240)
        wait_for(lambda: not rig.catalog_rows("SELECT 1 FROM alarms WHERE kind = 'disk_full' AND cleared_ms IS NULL"),
                 timeout=30, what="the disk_full alarm cleared")
    finally:
        watch.stop()
        agent.terminate()
        receiver.terminate()
    assert not watch.violations, f"G2: recorder files deleted before the receiver held them: {watch.violations}"
    assert not list((rig.data_dir / "staging").glob("*.part"))
    assert "Exception in thread" not in rig.agent_log()   # no worker died
    rig.check_delivered()
    rig.check_chains()
    purged = rig.catalog_rows("SELECT COUNT(*) FROM audit WHERE action = 'file.purged'")[0][0]
    assert purged >= 1, "the recorder outsized the disk: confirmed files must have been purged under pressure"
