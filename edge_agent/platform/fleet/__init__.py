"""The fleet monitor: the platform's view of every agent from the MQTT health topics (docs/OPERATIONS.md,
"Watching the fleet"). `FleetMonitor` listens and keeps (monitor.py), `model` derives, `Exposition` serves the
figures to Prometheus (exporter.py); `read_fleet` and `read_agent` are what `fleet status` and `fleet show`
read from the monitor's database, in another process while it runs."""

from __future__ import annotations

from typing import Any

from edge_agent.catalog.fleet import FleetStore
from edge_agent.clock import now_ms
from edge_agent.config import FleetSection
from edge_agent.platform.fleet.model import AgentRecord, assess, worst_first


def _assess(cfg: FleetSection, record: dict[str, Any], now: int) -> dict[str, Any]:
    return assess(AgentRecord.from_dict(record), now, cfg.stale_intervals, int(cfg.regression_hold_h * 3_600_000))


def read_fleet(cfg: FleetSection) -> list[dict[str, Any]]:
    """Every agent the monitor knows, assessed now, worst first."""
    store = FleetStore(cfg.db_path, readonly=True)
    try:
        records = store.records()
    finally:
        store.close()
    now = now_ms()
    return worst_first([_assess(cfg, record, now) for record in records.values()])


def read_agent(cfg: FleetSection, agent_id: str, events: int) -> dict[str, Any] | None:
    """One agent assessed now, with its last health snapshot and its newest `events` events; None if unknown."""
    store = FleetStore(cfg.db_path, readonly=True)
    try:
        record = store.record(agent_id)
        if record is None:
            return None
        return {**_assess(cfg, record, now_ms()), "health": store.health(agent_id),
                "events": [{"received_ms": received, **event} for received, event in store.events(agent_id, events)]}
    finally:
        store.close()
