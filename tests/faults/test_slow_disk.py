"""A slow disk: the agent's data_dir on a loop-mounted ext4 image, with the agent process in a blkio
cgroup that throttles that device to 4 MB/s of reads and of writes (fsync'd copies and the cache-dropped
read-back both pay it). Everything still arrives intact and is cleared only after its ack; no timeout on
the way turns slowness into a false alarm, a rejection or a lost file."""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.rig import ClearWatch, Rig, agent_process, receiver_process, seed, wait_drained
from tests.helpers import wait_for
from tests.peers.mosquitto import Mosquitto

BPS = 4 * 1000 * 1000
BLKIO = Path("/sys/fs/cgroup/blkio")


@pytest.fixture
def slow_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(data_dir on a throttled ext4 loop device, the cgroup.procs file a process joins to be throttled)."""
    if not (BLKIO / "cgroup.procs").exists():
        pytest.fail("no cgroup v1 blkio controller at /sys/fs/cgroup/blkio: this test needs it to slow a disk")
    image, data = tmp_path / "disk.img", tmp_path / "agent-data"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                          text=True).stdout.strip()
    group = BLKIO / f"edge-agent-slow-{uuid.uuid4().hex[:8]}"
    try:
        data.mkdir()
        subprocess.run(["mount", loop, str(data)], check=True)
        os.chmod(data, 0o750)
        device = os.stat(loop).st_rdev
        group.mkdir()
        for knob in ("blkio.throttle.write_bps_device", "blkio.throttle.read_bps_device"):
            (group / knob).write_text(f"{os.major(device)}:{os.minor(device)} {BPS}\n")
        yield data, group / "cgroup.procs"
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
        if group.exists():
            group.rmdir()


def _throttled_bytes(group: Path, op: str) -> int:
    """Bytes of `op` (Read, Write) the cgroup's processes did on throttled devices."""
    total = 0
    for line in (group / "blkio.throttle.io_service_bytes").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == op:
            total += int(parts[2])
    return total


def test_slow_disk_delivers_everything_without_false_alarms(tmp_path: Path, slow_disk: tuple[Path, Path],
                                                            mosquitto: Mosquitto) -> None:
    data, procs = slow_disk
    run_seed = seed()
    rng = random.Random(run_seed)
    print(f"slow-disk seed={run_seed}")
    rig = Rig(tmp_path, mosquitto.port)
    assert rig.data_dir == data
    sizes = [rng.randrange(3 << 20, 6 << 20) for _ in range(4)] + [200_000]
    rig.add_files(sizes, rng)
    agent, receiver = agent_process(rig), receiver_process(rig)
    watch = ClearWatch(rig)
    watch.start()
    receiver.start()
    agent.start()
    assert agent.proc is not None
    procs.write_text(f"{agent.proc.pid}\n")   # from now on every read and write of data_dir runs at 4 MB/s
    try:
        wait_for(lambda: str(agent.proc.pid) in procs.read_text().split(), timeout=5, what="agent throttled")
        wait_drained(rig, timeout=180)
        # The agent's copies really went through the throttled device (the cgroup's own byte count).
        written = _throttled_bytes(procs.parent, "Write")
        assert written >= sum(sizes), f"only {written} of {sum(sizes)} bytes went through the throttled device"
    finally:
        watch.stop()
        agent.terminate()
        receiver.terminate()
    assert not watch.violations, f"G2: recorder files deleted before the receiver held them: {watch.violations}"
    rig.check_delivered()
    rig.check_chains()
    raised = rig.catalog_rows("SELECT kind, message FROM alarms")
    assert not raised, f"slowness raised alarms: {[dict(r) for r in raised]}"
    assert "Exception in thread" not in rig.agent_log()
