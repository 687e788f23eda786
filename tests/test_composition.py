"""The composition root and the operations wiring: parts are declared and built once, in start order; the health
snapshot is assembled from named providers; the scheduler runs plain callables."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.daemon import Agent, Operations, build_agent
from edge_agent.ops.health import NO_UPLINK, HealthMonitor
from edge_agent.ops.retention import Retention
from edge_agent.ops.scheduler import Job, Scheduler
from edge_agent.protocol.wire import validate
from edge_agent.sync import Uplink
from tests.helpers import agent_config


class Fragment:
    """A provider whose fragment a test changes at will."""

    def __init__(self, **fragment: Any):
        self.fragment = fragment

    def health(self) -> dict[str, Any]:
        return self.fragment


def test_build_agent_declares_its_parts_in_start_order(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path)
    agent = build_agent(cfg, dock_drivers=[])
    try:
        assert isinstance(agent.uplink, Uplink) and agent.cameras is None
        assert isinstance(agent.operations, Operations)
        assert agent.components == [agent.uplink, agent.operations]
        with pytest.raises(RuntimeError, match="already has an uplink"):
            agent.add_uplink()
    finally:
        agent.catalog.close()


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Agent]:
    _, cfg = agent_config(tmp_path)
    agent = Agent(cfg, dock_drivers=[])
    yield agent
    agent.catalog.close()


def test_core_agent_has_no_optional_parts(core: Agent) -> None:
    assert (core.uplink, core.cameras, core.operations, core.components) == (None, None, None, [])
    assert set(core.health()) == {"version", "pid", "uptime_s", "key_id"}


def test_snapshot_places_each_providers_fragment_and_sees_a_slot_change(core: Agent) -> None:
    agent, cfg = core, core.config
    slot = {"dock": "bench", "slot": 1, "label": "VOL1", "state": "ingesting", "device_id": "DSJ-1", "model": None,
            "serial": None, "officer_id": None, "session_id": None, "docked_ms": 1, "files_total": 0,
            "files_pending": 0, "bytes_total": 0, "bytes_copied": 0, "rate_bps": 0.0, "last_error": None}
    docks = Fragment(docks=[slot])
    sync = {"connected": True, "rate_bps": 1.0, "last_ack_ms": None, "last_ack": None, "bytes_sent": 5,
            "in_flight": 0, "configured": True}
    monitor = HealthMonitor(cfg, agent.catalog, agent.layout, Retention(agent.catalog, agent.layout, cfg),
                            process=agent, docks=docks, uplink=Fragment(sync=sync),
                            scrub=Fragment(scrub={"last_run_ms": 7}))
    snapshot = monitor.tick()
    validate("health", snapshot)
    assert snapshot["docks"] == [slot] and snapshot["cameras"] == []
    assert snapshot["agent"]["sync"] == sync and snapshot["agent"]["scrub"] == {"last_run_ms": 7}
    assert snapshot["agent"]["key_id"] == agent.key.key_id
    assert not monitor.check_change()

    docks.fragment = {"docks": [{**slot, "state": "done"}]}
    assert monitor.check_change()
    assert not monitor.check_change()


def test_a_part_left_out_shows_as_not_there(core: Agent) -> None:
    snapshot = core.health_monitor(Retention(core.catalog, core.layout, core.config)).snapshot()
    assert snapshot["agent"]["sync"] == NO_UPLINK["sync"]
    assert snapshot["agent"]["sync"]["configured"] is False and snapshot["agent"]["scrub"] == {}


def test_scheduler_runs_plain_callables_and_a_failing_job_does_not_stop_the_others(tmp_path: Path) -> None:
    ran = threading.Event()

    def fail() -> None:
        raise RuntimeError("boom")

    _, cfg = agent_config(tmp_path)
    scheduler = Scheduler(cfg.agent.zone)
    scheduler.run_now("work")  # before start: nothing to move, and no error on the caller's thread
    scheduler.add(Job("fail", fail, "interval", first_after_s=0, schedule={"seconds": 3600}))
    scheduler.add(Job("work", ran.set, "interval", schedule={"seconds": 3600}))
    scheduler.start()
    try:
        scheduler.run_now("work")
        assert ran.wait(5)
    finally:
        scheduler.stop()
    assert scheduler.stopping.is_set()
