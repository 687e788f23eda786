"""Outages and partitions during a large transfer: the broker stopped for random intervals, the link stalled
without a FIN, then reset. The agent keeps ingesting into its store while the platform is out of reach, and
drains everything when the link returns: nothing lost, nothing twice, nothing cleared early.

FAULTS_OUTAGES (default 3) sets the number of broker outages; `scripts/torture.sh` runs 20.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from tests.faults.rig import SEED_ENV, ClearWatch, Rig, agent_process, receiver_process, seed, wait_drained
from tests.helpers import wait_for
from tests.peers.mosquitto import Mosquitto
from tests.peers.stall_proxy import StallProxy

OUTAGES = int(os.environ.get("FAULTS_OUTAGES", "3"))
LARGE = int(os.environ.get("FAULTS_LARGE_MB", "48")) << 20


def _sealed_while_offline(rig: Rig, names: list[str]) -> bool:
    """All of `names` sealed into the local store ('sending' too: the uplink may take a file before it finds
    out that its link is dead)."""
    marks = ",".join("?" * len(names))
    rows = rig.catalog_rows(f"SELECT COUNT(*) FROM files WHERE original_path IN ({marks})"
                            " AND state IN ('sealed', 'sending')", tuple(names))
    return bool(rows) and rows[0][0] == len(names)


def test_broker_outages_during_a_large_transfer_buffer_to_disk_and_drain(tmp_path: Path,
                                                                         mosquitto: Mosquitto) -> None:
    run_seed = seed()
    rng = random.Random(run_seed)
    print(f"outage suite seed={run_seed} outages={OUTAGES} (replay: {SEED_ENV}={run_seed} FAULTS_OUTAGES={OUTAGES})")
    # A 40 Mbit/s uplink, so that the outages fall inside the large transfer.
    rig = Rig(tmp_path, mosquitto.port, mqtt_extra={"bandwidth_kbps": 40_000})
    agent, receiver = agent_process(rig), receiver_process(rig)
    watch = ClearWatch(rig)
    watch.start()
    (large, _small) = rig.add_files([LARGE, 200_000], rng)
    receiver.start()
    agent.start()
    mid_transfer = 0
    try:
        wait_for(lambda: rig.count(("sending",)) > 0, timeout=60, what="the large transfer under way")
        for cycle in range(OUTAGES):
            time.sleep(rng.uniform(0.2, 1.5))   # a random instant of the transfer
            mosquitto.stop()
            mid_transfer += bool(rig.catalog_rows("SELECT 1 FROM files WHERE original_path = ? AND state = 'sending'",
                                                  (large,)))
            arrived = rig.add_files([rng.choice([100_000, 1_000_000, 3_000_000])], rng)
            wait_for(lambda arrived=arrived: _sealed_while_offline(rig, arrived), timeout=60,
                     what="a recording that arrived during the outage sealed into the local store")
            down = rng.uniform(0.5, 4.0)
            time.sleep(down)                    # the outage itself lasts a random while
            mosquitto.start()
            print(f"outage {cycle + 1}/{OUTAGES}: broker down {down:.1f} s")
        wait_drained(rig, timeout=180)
    finally:
        watch.stop()
        agent.terminate()
        receiver.terminate()
    print(f"outages that cut the large transfer mid-way: {mid_transfer}/{OUTAGES}")
    assert mid_transfer >= 1, "no outage fell inside the large transfer: raise FAULTS_LARGE_MB"
    assert not watch.violations, f"G2: recorder files deleted before the receiver held them: {watch.violations}"
    rig.check_delivered()
    rig.check_chains()


def test_link_stalled_without_fin_then_reset_keeps_ingesting_and_drains(tmp_path: Path,
                                                                        mosquitto: Mosquitto) -> None:
    run_seed = seed()
    rng = random.Random(run_seed)
    print(f"partition seed={run_seed}")
    proxy = StallProxy(mosquitto.port).start()
    rig = Rig(tmp_path, mosquitto.port)
    rig.write_configs(mosquitto.port, agent_port=proxy.port)   # the agent reaches the broker only through the proxy
    agent, receiver = agent_process(rig), receiver_process(rig)
    watch = ClearWatch(rig)
    watch.start()
    rig.add_files([LARGE // 2], rng)
    receiver.start()
    agent.start()
    try:
        wait_for(lambda: rig.count(("sending",)) > 0, timeout=60, what="the transfer under way")
        first = proxy.connections
        proxy.stall()                             # packets vanish; no FIN, no RST reaches the agent
        arrived = rig.add_files([2_000_000, 300_000], rng)
        wait_for(lambda: _sealed_while_offline(rig, arrived), timeout=60, what="ingest goes on while partitioned")
        # The agent finds out by its keepalive and dials again (the new connection hangs in the partition).
        wait_for(lambda: proxy.connections > first, timeout=60, what="the agent noticing the dead link")
        proxy.heal()
        wait_for(lambda: rig.count(("synced", "source_cleared")) >= 1, timeout=120, what="sync resumed")
        proxy.cut()                               # then a hard reset of every connection
        arrived = rig.add_files([1_500_000], rng)
        wait_drained(rig, timeout=180)
    finally:
        watch.stop()
        agent.terminate()
        receiver.terminate()
        proxy.close()
    assert not watch.violations, f"G2: recorder files deleted before the receiver held them: {watch.violations}"
    rig.check_delivered()
    rig.check_chains()
