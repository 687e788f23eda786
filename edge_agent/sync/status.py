"""The agent's presence on `{root}/{agent}/status` (retained): `online` on every connect, `offline` on a
clean stop, and the same `offline` as the MQTT will, which the broker publishes if the agent vanishes."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from edge_agent.clock import now_ms
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.wire import Topics


class Presence:
    """The status messages of one agent (schema `status`)."""

    def __init__(self, client: mqtt.Client, topics: Topics, version: str):
        self.client = client
        self.topics = topics
        self.version = version

    def payload(self, state: str) -> bytes:
        return canonical_json({"state": state, "ts": now_ms(), "version": self.version})

    def set_will(self) -> None:
        """Before every connect attempt, so the will's timestamp is that of the attempt."""
        self.client.will_set(self.topics.status, self.payload("offline"), qos=1, retain=True)

    def online(self, client: mqtt.Client) -> None:
        client.publish(self.topics.status, self.payload("online"), qos=1, retain=True)

    def offline(self) -> tuple[str, bytes]:
        """(topic, payload) for `Connection.stop(last_will=...)`."""
        return self.topics.status, self.payload("offline")
