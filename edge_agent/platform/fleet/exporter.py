"""The fleet as Prometheus metrics (text exposition through prometheus-client), computed at each scrape.

Every per-agent series carries `agent`, `site` and `unit` labels, plus `kind` (alarms: a fixed set and
"other"), `head` (chain, audit) or `version` (the info series) — never a file, camera or event: the number of
series is at most a few dozen per agent, and agents are capped by `fleet.max_agents`. docs/OPERATIONS.md lists
every metric; config/prometheus/alerts.yml alerts on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge_agent.platform.fleet.model import HEADS, parse_head
from edge_agent.platform.fleet.monitor import FleetMonitor

AGENT_LABELS = ["agent", "site", "unit"]

# (metric, help, the figure it reads, scale); the figure may be None (then no sample: "unknown", not 0).
FIGURES: tuple[tuple[str, str, str, float], ...] = (
    ("edge_fleet_health_interval_seconds", "The agent's health interval (health.interval_s).", "interval_s", 1),
    ("edge_fleet_unsynced_files", "Files not yet confirmed by the platform.", "queue_files", 1),
    ("edge_fleet_unsynced_bytes", "Bytes not yet confirmed by the platform.", "queue_bytes", 1),
    ("edge_fleet_sync_rate_bytes_per_second", "The agent's recent upload rate.", "sync_rate_bps", 1),
    ("edge_fleet_disk_used_ratio", "The worse of store and filesystem use, 0..1.", "disk_used_percent", 0.01),
    ("edge_fleet_disk_free_bytes", "Free bytes on the agent's store filesystem.", "disk_free_bytes", 1),
    ("edge_fleet_disk_days_until_full", "Days until the store is full at the last 7 days' intake.",
     "disk_days_until_full", 1),
    ("edge_fleet_cameras", "Cameras configured on the agent.", "cameras", 1),
    ("edge_fleet_cameras_connected", "Cameras whose stream is connected.", "cameras_connected", 1),
    ("edge_fleet_cameras_recording", "Cameras recording segments now.", "cameras_recording", 1),
    ("edge_fleet_camera_gaps_today", "Recording gaps today, all cameras of the agent.", "camera_gaps_today", 1),
    ("edge_fleet_docks", "Dock slots the agent reports.", "docks", 1),
    ("edge_fleet_docks_occupied", "Dock slots with a recorder in them.", "docks_occupied", 1),
    ("edge_fleet_clock_offset_seconds", "The agent's clock offset from NTP time.", "clock_offset_ms", 0.001),
    ("edge_fleet_uptime_seconds", "Seconds since the agent process started.", "uptime_s", 1),
)


def _flag(value: bool | None) -> float | None:
    return None if value is None else float(value)


class FleetCollector:
    """The per-agent series, read from the monitor at each scrape."""

    def __init__(self, monitor: FleetMonitor):
        self.monitor = monitor

    def describe(self) -> Iterator[Metric]:
        # Named, so that `/metrics?name[]=edge_fleet_messages_total` skips the per-agent work entirely.
        return self._per_agent([])

    def collect(self) -> Iterator[Metric]:
        return self._per_agent(self.monitor.assessed())

    def _per_agent(self, assessed: list[dict[str, Any]]) -> Iterator[Metric]:
        up = GaugeMetricFamily("edge_fleet_agent_up", "1 online, 0 offline (its status topic; the will says "
                               "offline when its connection is lost).", labels=AGENT_LABELS)
        stale = GaugeMetricFamily("edge_fleet_agent_stale", "1 when no health came for fleet.stale_intervals of "
                                  "its interval while not offline.", labels=AGENT_LABELS)
        age = GaugeMetricFamily("edge_fleet_health_age_seconds", "Seconds since its last health snapshot arrived.",
                                labels=AGENT_LABELS)
        info = GaugeMetricFamily("edge_fleet_agent_info", "The agent's version.", labels=[*AGENT_LABELS, "version"])
        oldest = GaugeMetricFamily("edge_fleet_unsynced_oldest_age_seconds", "Age of the oldest file not yet on "
                                   "the platform (0 with none); R1 allows 24 h.", labels=AGENT_LABELS)
        connected = GaugeMetricFamily("edge_fleet_sync_connected", "1 when the agent's uplink is connected.",
                                      labels=AGENT_LABELS)
        synchronized = GaugeMetricFamily("edge_fleet_clock_synchronized", "1 when the agent's clock is NTP "
                                         "synchronised.", labels=AGENT_LABELS)
        alarms = GaugeMetricFamily("edge_fleet_alarms", "Active alarms by kind.", labels=[*AGENT_LABELS, "kind"])
        seq = GaugeMetricFamily("edge_fleet_head_sequence", "Sequence of the chain or audit head.",
                                labels=[*AGENT_LABELS, "head"])
        regressed = GaugeMetricFamily("edge_fleet_head_regressed", "1 for fleet.regression_hold_h after a head "
                                      "went backwards or changed without growing.", labels=[*AGENT_LABELS, "head"])
        regressions = CounterMetricFamily("edge_fleet_head_regressions", "Head regressions seen.",
                                          labels=[*AGENT_LABELS, "head"])
        refused = CounterMetricFamily("edge_fleet_agent_refused", "This agent's messages refused (see fleet show).",
                                      labels=AGENT_LABELS)
        figures = {name: GaugeMetricFamily(name, help_text, labels=AGENT_LABELS) for name, help_text, _, _ in FIGURES}
        for a in assessed:
            labels = [a["agent_id"], a["site"], a["unit"]]
            f = a["figures"]
            if a["online"] is not None:
                up.add_metric(labels, float(a["online"]))
            stale.add_metric(labels, float(a["stale"]))
            refused.add_metric(labels, a["refused"].get("count", 0))
            for head in HEADS:
                regression = a["regressions"].get(head, {})
                regressions.add_metric([*labels, head], regression.get("count", 0))
                regressed.add_metric([*labels, head], float(a["regressed"].get(head, False)))
            if not f:
                continue
            age.add_metric(labels, a["health_age_s"])
            info.add_metric([*labels, f["version"]], 1)
            oldest.add_metric(labels, f["oldest_unsynced_age_s"] or 0)
            connected.add_metric(labels, float(f["sync_connected"]))
            if (value := _flag(f["clock_synchronized"])) is not None:
                synchronized.add_metric(labels, value)
            for kind, count in f["alarms"].items():
                alarms.add_metric([*labels, kind], count)
            for head in HEADS:
                if (parsed := parse_head(f.get(f"{head}_head"))) is not None:
                    seq.add_metric([*labels, head], parsed[0])
            for name, _, key, scale in FIGURES:
                if f.get(key) is not None:
                    figures[name].add_metric(labels, f[key] * scale)
        yield from (up, stale, age, info, oldest, connected, synchronized, alarms, seq, regressed, regressions,
                    refused, *figures.values())



class MonitorCollector:
    """The monitor's own health: cheap, also alone (`/metrics?name[]=...`)."""

    def __init__(self, monitor: FleetMonitor):
        self.monitor = monitor

    def describe(self) -> Iterator[Metric]:
        return self.collect()

    def collect(self) -> Iterator[Metric]:
        stats = self.monitor.stats
        agents = len(self.monitor.records)
        messages = CounterMetricFamily("edge_fleet_messages", "Messages received, by topic.", labels=["topic"])
        for topic, count in stats.messages.items():
            messages.add_metric([topic], count)
        refused = CounterMetricFamily("edge_fleet_refused", "Messages refused, by topic and reason (too_large, "
                                      "not_json, too_deep, schema, agent_mismatch, agent_limit, bad_topic).",
                                      labels=["topic", "reason"])
        for (topic, reason), count in sorted(stats.refused.items()):
            refused.add_metric([topic, reason], count)
        yield messages
        yield refused
        yield GaugeMetricFamily("edge_fleet_agents", "Agents the monitor knows.", value=agents)
        yield GaugeMetricFamily("edge_fleet_mqtt_connected", "1 while the monitor is connected to the broker.",
                                value=float(self.monitor.connection.connected.is_set()))
        last = stats.last_message_ms
        yield GaugeMetricFamily("edge_fleet_last_message_age_seconds", "Seconds since the monitor's last message "
                                "(NaN before the first).",
                                value=float("nan") if last is None else max(0.0, (self.monitor.clock() - last) / 1000))
        yield CounterMetricFamily("edge_fleet_flush_failures", "Failed writes to the fleet database.",
                                  value=stats.flush_failures)


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9108`)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"fleet.listen = {listen!r}: expected host:port, e.g. 127.0.0.1:9108")
    return host.strip("[]") or "0.0.0.0", int(port)


def registry_for(monitor: FleetMonitor) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(FleetCollector(monitor))
    registry.register(MonitorCollector(monitor))
    registry.register(ProcessCollector(registry=None))
    return registry


class Exposition:
    """The HTTP endpoint (`/metrics`) of one monitor."""

    def __init__(self, monitor: FleetMonitor, listen: str):
        host, port = parse_listen(listen)
        self.server, self.thread = start_http_server(port, host, registry=registry_for(monitor))
        self.address = self.server.server_address[:2]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
