"""`edge-agent fleet serve|status|show`: the platform's fleet monitor (edge_agent/platform/fleet)."""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edge_agent.config import FleetConfig
from edge_agent.i18n import N_
from edge_agent.services.workspace import Result, ServiceError


def serve(config: FleetConfig, listen: str | None = None) -> None:
    """Run the monitor and its Prometheus endpoint until SIGTERM."""
    from edge_agent.platform.fleet.exporter import Exposition  # the platform side: loaded only for the fleet
    from edge_agent.platform.fleet.monitor import FleetMonitor

    listen = listen or config.fleet.listen
    try:
        monitor = FleetMonitor(config)
    except (OSError, sqlite3.Error) as exc:
        raise ServiceError(N_("cannot open the fleet database {path}: {error}; check fleet.db_path and its "
                              "directory's permissions"), code=2, path=config.fleet.db_path, error=exc) from exc
    try:
        exposition = Exposition(monitor, listen)
    except ValueError as exc:
        raise ServiceError.of(exc, code=2) from exc
    except OSError as exc:
        raise ServiceError(N_("cannot listen on {listen}: {error}; pick a free address with --listen"), code=2,
                           listen=listen, error=exc.strerror) from exc
    try:
        monitor.run_forever()
    finally:
        exposition.close()


@dataclass(frozen=True)
class FleetStatus(Result):
    """Every agent, worst first, with the counts of the summary line."""

    agents: int
    counts: dict[str, int]          # online, offline, stale, r1_breach, regressed, with_problems
    fleet: list[dict[str, Any]]


def _read(call: Any, config: FleetConfig, *args: Any) -> Any:
    try:
        return call(config.fleet, *args)
    except FileNotFoundError as exc:
        raise ServiceError.of(exc, code=2) from exc


def status(config: FleetConfig) -> FleetStatus:
    from edge_agent.platform.fleet import read_fleet

    fleet = _read(read_fleet, config)
    counts = Counter()
    for a in fleet:
        counts["online"] += a["online"] is True
        counts["offline"] += a["online"] is False
        counts["stale"] += a["stale"]
        counts["r1_breach"] += a["r1_breach"]
        counts["regressed"] += any(a["regressed"].values())
        counts["with_problems"] += bool(a["problems"])
    keys = ("online", "offline", "stale", "r1_breach", "regressed", "with_problems")
    return FleetStatus(agents=len(fleet), counts={k: counts[k] for k in keys}, fleet=fleet)


def show(config: FleetConfig, agent_id: str, events: int = 20) -> dict[str, Any]:
    from edge_agent.platform.fleet import read_agent

    detail = _read(read_agent, config, agent_id, events)
    if detail is None:
        raise ServiceError(N_("no agent {agent!r} known to the fleet monitor; `edge-agent fleet status` lists "
                              "the agents it has heard from"), agent=agent_id)
    return detail
