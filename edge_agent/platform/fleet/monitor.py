"""The fleet monitor: every agent's status, health and events from MQTT, kept in memory and in SQLite.

It subscribes to `{root}/+/status`, `{root}/+/health` and `{root}/+/events` (QoS 1). The broker hands it every
retained status and health at once, so a fresh monitor has the whole fleet's picture within seconds; the
database (`FleetStore`) adds what retained messages cannot: the heads to compare the next snapshot against,
regressions seen, refusals, and each agent's recent events.

Threads: paho's network thread runs `ingest` (parse, derive, update the record under the lock: cheap, never
blocking on the disk); `fleet-flush` writes what changed every `flush_interval_s` in one transaction. Memory per
agent is its record (the derived figures, not the snapshot; the snapshot goes to the database only), and the
number of agents is capped at `max_agents` (more are refused and counted), so memory and the exporter's series
are bounded whatever is published.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.catalog.fleet import FleetStore
from edge_agent.clock import now_ms
from edge_agent.config import FleetConfig
from edge_agent.platform.fleet.model import (
    MAX_AGENT_ID,
    REFUSALS,
    TOPICS,
    AgentRecord,
    Refusal,
    assess,
    read_payload,
)
from edge_agent.protocol.connection import Connection, build_client

log = logging.getLogger(__name__)


@dataclass
class IntakeStats:
    """The monitor's own health (exported as `edge_fleet_messages_total` and friends)."""

    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    refused: dict[tuple[str, str], int] = field(default_factory=dict)   # (topic, reason) -> count
    regressions: int = 0
    last_message_ms: int | None = None
    flush_failures: int = 0


class FleetMonitor:
    """Subscribes, derives, keeps. `ingest` is the whole message path (tests and the benchmark call it too)."""

    def __init__(self, config: FleetConfig, *, clock: Callable[[], int] = now_ms):
        self.config = config
        self.cfg = config.fleet
        self.root = config.mqtt.root
        self.clock = clock
        self.store = FleetStore(self.cfg.db_path)
        self._lock = threading.Lock()
        self.records: dict[str, AgentRecord] = {
            agent: AgentRecord.from_dict(data) for agent, data in self.store.records().items()}
        self.stats = IntakeStats()
        self._dirty: set[str] = set()
        self._pending_health: dict[str, dict[str, Any]] = {}
        self._pending_events: list[tuple[str, int, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        client = build_client(config.mqtt, self.cfg.client_id)
        client.on_message = self._on_message
        self.connection = Connection(client, config.mqtt, session_expiry_s=self.cfg.session_expiry_s,
                                     on_up=self._subscribe)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._flusher = threading.Thread(target=self._flush_loop, name="fleet-flush", daemon=True)
        self._flusher.start()
        self.connection.start("fleet-mqtt")

    def stop(self) -> None:
        self.connection.stop()
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(30)
        self.flush()
        self.store.close()

    def run_forever(self, ready: Callable[[], None] | None = None) -> None:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.start()
        if ready is not None:
            ready()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            self.stop()

    def _subscribe(self, client: mqtt.Client) -> None:
        client.subscribe([(f"{self.root}/+/{kind}", 1) for kind in TOPICS])
        log.info("event=fleet_subscribed root=%s", self.root)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        self.ingest(message.topic, message.payload)

    # -- the message path ------------------------------------------------------------------------

    def ingest(self, topic: str, payload: bytes) -> None:
        """One message from `{root}/{agent}/{status|health|events}`."""
        received = self.clock()
        prefix = self.root + "/"
        agent, _, kind = topic[len(prefix):].partition("/") if topic.startswith(prefix) else ("", "", "")
        with self._lock:
            self.stats.last_message_ms = received
            if kind not in TOPICS or not agent or len(agent) > MAX_AGENT_ID:
                self._count_refusal(kind if kind in TOPICS else "other", "bad_topic")
                log.warning("event=fleet_refused reason=bad_topic topic=%.200r", topic)
                return
            self.stats.messages[kind] += 1
        limit = (self.cfg.max_event_kib if kind == "events" else self.cfg.max_health_kib) * 1024
        value = read_payload(kind, payload, limit)
        with self._lock:
            record = self.records.get(agent)
            if record is None:
                if len(self.records) >= self.cfg.max_agents:
                    self._count_refusal(kind, "agent_limit")
                    return
                record = self.records[agent] = AgentRecord(agent)
            if kind == "health" and isinstance(value, dict) and value["agent_id"] != agent:
                value = Refusal("agent_mismatch", f"snapshot of {value['agent_id']!r} on {agent!r}'s topic")
            if isinstance(value, Refusal):
                self._count_refusal(kind, value.reason)
                record.refuse(value, received)
                self._dirty.add(agent)
                log.warning("event=fleet_refused agent=%r topic=%s reason=%s payload_bytes=%d: %s; the agent's "
                            "last good state is kept", agent, kind, value.reason, len(payload), value.detail)
                return
            if kind == "status":
                record.take_status(value, received)
            elif kind == "health":
                for why in record.take_health(value, received, self.cfg.default_interval_s):
                    self.stats.regressions += 1
                    log.error("event=head_regressed agent=%r %s: check the agent's catalog (restored backup? "
                              "replaced database?) and run `edge-agent audit verify` there", agent, why)
                    self._pending_events.append((agent, received, {"type": "fleet_regression", "ts": received,
                                                                   "message": why}))
                self._pending_health[agent] = value
            else:
                self._pending_events.append((agent, received, value))
            self._dirty.add(agent)

    def _count_refusal(self, kind: str, reason: str) -> None:
        assert reason in REFUSALS
        self.stats.refused[(kind, reason)] = self.stats.refused.get((kind, reason), 0) + 1

    # -- keeping ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what changed since the last flush (one transaction)."""
        with self._lock:
            records = [(agent, self.records[agent].as_dict()) for agent in self._dirty]
            healths, events = self._pending_health, self._pending_events
            self._dirty, self._pending_health, self._pending_events = set(), {}, []
        if not (records or events):
            return
        try:
            self.store.save(records, healths.items(), events, self.clock(), self.cfg.events_per_agent)
        except BaseException:
            with self._lock:   # kept for the next flush: nothing heard is lost to a failed write
                self._dirty.update(agent for agent, _ in records)
                self._pending_health = {**healths, **self._pending_health}
                self._pending_events = events + self._pending_events
            raise

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.cfg.flush_interval_s):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 (keep ingesting; the next flush retries nothing lost in memory)
                self.stats.flush_failures += 1
                log.error("event=fleet_flush_failed db=%s error=%s: %s; check the disk and permissions of "
                          "fleet.db_path", self.cfg.db_path, type(exc).__name__, exc)

    # -- reading ---------------------------------------------------------------------------------

    def assessed(self) -> list[dict[str, Any]]:
        """Every agent as `model.assess` sees it now."""
        now = self.clock()
        with self._lock:
            records = list(self.records.values())
        hold_ms = int(self.cfg.regression_hold_h * 3600 * 1000)
        return [assess(r, now, self.cfg.stale_intervals, hold_ms) for r in records]
