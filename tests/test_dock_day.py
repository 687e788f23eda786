"""A dock day: recorders docked while the uplink drains (issue 15).

On a small workstation ingest and upload compete for the same cores, and an officer waits at the dock for 可取走
(safe to take) while the platform can wait a little: the uplink holds its chunks while a bay is collecting
(`mqtt.yield_to_docks_s`, at most that long at a stretch) and sends them once the bays are done. The time it
saves is measured by scripts/bench_dock_day.py (docs/BENCHMARKS.md, "Dock day").
"""

from __future__ import annotations

from pathlib import Path

from tests.evidence_support import running_agent
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import subscribed_client

IDENTITY = {"DeviceID": "A123456", "PoliceID": "320102999", "SerialNo": "ZFY0500"}


def dock_day_agent(tmp_path: Path, port: int, **mqtt: object):  # noqa: ANN201 - (dock root, AgentConfig)
    root = tmp_path / "dock"
    root.mkdir()
    # settle_s holds a file still being written back for a few passes: the bay collects for that long after
    # its other files are sealed (and would be sent).
    _, cfg = agent_config(tmp_path, mqtt={"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1,
                                          "reconnect_max_s": 0.5, **mqtt},
                          docks=[{"name": "bench", "kind": "directory", "root": str(root), "settle_s": 3,
                                  "rescan_s": 0.2}])
    return root, cfg


def dock_recorder(tmp_path: Path, root: Path) -> None:
    aside = make_recorder_volume(tmp_path / "aside", "ZFY0500", {"DCIM/100MEDIA/FILE0001.MP4": 2 << 20,
                                                                "DCIM/100MEDIA/FILE0002.MP4": 1 << 20},
                                 identity=IDENTITY)
    make_recorder_volume(tmp_path / "aside", "ZFY0500", {"DCIM/100MEDIA/FILE0003.MP4": 1 << 20}, age_s=0)
    aside.rename(root / aside.name)     # docked whole, as a recorder is plugged in


def sealed(agent) -> int:  # noqa: ANN001 - the running Agent
    """Files sealed (or further on: being sent)."""
    return agent.catalog.query("SELECT COUNT(*) FROM files WHERE state NOT IN ('discovered', 'staged')")[0][0]


def test_uploads_wait_while_a_bay_collects_and_go_once_it_is_safe_to_take(tmp_path: Path,
                                                                           mosquitto: Mosquitto) -> None:
    root, cfg = dock_day_agent(tmp_path, mosquitto.port, yield_to_docks_s=300)
    with running_agent(cfg) as agent:
        collecting_at_chunk: list[bool] = []     # for each chunk on the wire: was a bay collecting then?
        watch = subscribed_client(mosquitto.port, "watch", f"{cfg.mqtt.root}/{cfg.agent.id}/files/+/chunk",
                                  lambda _payload: collecting_at_chunk.append(agent.docks.collecting()))
        try:
            assert agent.uplink is not None
            wait_for(lambda: agent.uplink.health()["sync"]["connected"], what="the uplink connected")
            dock_recorder(tmp_path, root)
            wait_for(lambda: sealed(agent) >= 2 and agent.docks.collecting(),
                     what="two files sealed while the bay still collects")
            wait_for(lambda: not agent.docks.collecting(), what="the bay done")
            wait_for(lambda: collecting_at_chunk, what="chunks sent once the bay is safe to take")
        finally:
            watch.disconnect()
            watch.loop_stop()
    assert not any(collecting_at_chunk), "a chunk went out while a bay was still collecting"


def test_the_hold_ends_after_yield_to_docks_s_even_while_a_bay_collects(tmp_path: Path,
                                                                          mosquitto: Mosquitto) -> None:
    root, cfg = dock_day_agent(tmp_path, mosquitto.port, yield_to_docks_s=0.5)
    with running_agent(cfg) as agent:
        collecting_at_chunk: list[bool] = []
        watch = subscribed_client(mosquitto.port, "watch", f"{cfg.mqtt.root}/{cfg.agent.id}/files/+/chunk",
                                  lambda _payload: collecting_at_chunk.append(agent.docks.collecting()))
        try:
            assert agent.uplink is not None
            wait_for(lambda: agent.uplink.health()["sync"]["connected"], what="the uplink connected")
            dock_recorder(tmp_path, root)
            wait_for(lambda: any(collecting_at_chunk), what="a chunk sent while the bay still collects")
        finally:
            watch.disconnect()
            watch.loop_stop()
