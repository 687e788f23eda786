"""A dock day: recorders docked while the uplink drains (issue 15).

On a small workstation ingest and upload compete for the same cores, and an officer waits at the dock for 可取走
(safe to take) while the platform can wait a little: while a bay is collecting the uplink sends at most at
`mqtt.yield_to_docks_kbps` (or holds its chunks when that is 0), for at most `mqtt.yield_to_docks_s` at a
stretch, and at full speed once the bays are done. What it saves is measured by scripts/bench_dock_day.py
(docs/BENCHMARKS.md, "Dock day").
"""

from __future__ import annotations

import time
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


def dock_recorder(tmp_path: Path, root: Path, first_mib: int = 2) -> None:
    aside = make_recorder_volume(tmp_path / "aside", "ZFY0500", {"DCIM/100MEDIA/FILE0001.MP4": first_mib << 20,
                                                                "DCIM/100MEDIA/FILE0002.MP4": 1 << 20},
                                 identity=IDENTITY)
    make_recorder_volume(tmp_path / "aside", "ZFY0500", {"DCIM/100MEDIA/FILE0003.MP4": 1 << 20}, age_s=0)
    aside.rename(root / aside.name)     # docked whole, as a recorder is plugged in


def sealed(agent) -> int:  # noqa: ANN001 - the running Agent
    """Files sealed (or further on: being sent)."""
    return agent.catalog.query("SELECT COUNT(*) FROM files WHERE state NOT IN ('discovered', 'staged')")[0][0]


def test_uploads_wait_while_a_bay_collects_and_go_once_it_is_safe_to_take(tmp_path: Path,
                                                                           mosquitto: Mosquitto) -> None:
    root, cfg = dock_day_agent(tmp_path, mosquitto.port, yield_to_docks_s=300, yield_to_docks_kbps=0)
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
    root, cfg = dock_day_agent(tmp_path, mosquitto.port, yield_to_docks_s=0.5, yield_to_docks_kbps=0)
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


def test_while_a_bay_collects_chunks_flow_at_most_at_yield_to_docks_kbps(tmp_path: Path,
                                                                         mosquitto: Mosquitto) -> None:
    kbps = 1000    # 125,000 bytes a second: the 6 MiB recorder would take 50 s, its bay collects for seconds
    root, cfg = dock_day_agent(tmp_path, mosquitto.port, yield_to_docks_s=300, yield_to_docks_kbps=kbps,
                               chunk_kib=64)
    with running_agent(cfg) as agent:
        during: list[tuple[float, int]] = []     # (arrival, frame bytes) of each chunk seen while the bay collects
        after: list[int] = []

        def on_chunk(payload: bytes) -> None:
            if agent.docks.collecting():
                during.append((time.monotonic(), len(payload)))
            else:
                after.append(len(payload))

        watch = subscribed_client(mosquitto.port, "watch", f"{cfg.mqtt.root}/{cfg.agent.id}/files/+/chunk",
                                  on_chunk)
        try:
            assert agent.uplink is not None
            wait_for(lambda: agent.uplink.health()["sync"]["connected"], what="the uplink connected")
            docked = time.monotonic()
            dock_recorder(tmp_path, root, first_mib=4)
            wait_for(lambda: during, what="a chunk sent while the bay still collects")
            wait_for(lambda: not agent.docks.collecting(), what="the bay done")
            wait_for(lambda: after, what="chunks sent once the bay is safe to take")
        finally:
            watch.disconnect()
            watch.loop_stop()
    # Every chunk counted in `during` left the agent between docking and its arrival: the yield's token bucket
    # lets through at most its burst (a chunk and its header) plus the rate times that span.
    span = during[-1][0] - docked
    sent = sum(size for _, size in during)
    burst = cfg.mqtt.chunk_kib * 1024 + 4096
    assert sent <= burst + kbps * 1000 / 8 * span, f"{sent} bytes in {span:.2f} s while the bay collected"
