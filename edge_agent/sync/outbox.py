"""The outbox relay: events queued durably in the catalog (alarms, ...) published on `{root}/{agent}/{topic}`.

A row is marked sent only on the broker's PUBACK; until then it is published again after a reconnect,
so an event survives outages and restarts (at least once; events carry their own keys). Runs on the
uplink's sender thread only.
"""

from __future__ import annotations

from edge_agent.catalog.events import Outbox
from edge_agent.protocol.wire import Topics
from edge_agent.sync.sender import Publish

BATCH = 100   # rows read per relay pass


class OutboxRelay:
    """Publishes unsent outbox rows once per connection and marks them sent on their PUBACK."""

    def __init__(self, repository: Outbox, topics: Topics, publish: Publish):
        self.repository = repository
        self.topics = topics
        self._publish = publish
        self._mids: dict[int, int] = {}   # paho mid -> outbox row id
        self._out: set[int] = set()       # rows published on this connection, not yet PUBACKed

    def reset(self) -> None:
        """A new connection: what was not PUBACKed goes again."""
        self._out.clear()

    def relay(self) -> None:
        """Publish the next unsent rows, oldest first, until the connection refuses one."""
        for row in self.repository.pending(BATCH):
            if row["id"] in self._out:
                continue
            info = self._publish(self.topics.agent(row["topic"]), row["payload"].encode("utf-8"))
            if info is None:
                return
            self._mids[info.mid] = row["id"]
            self._out.add(row["id"])

    def published(self, mid: int) -> None:
        """paho's PUBACK for message `mid` (any message: those that are not outbox rows are ignored)."""
        row_id = self._mids.pop(mid, None)
        if row_id is not None:
            self._out.discard(row_id)
            self.repository.mark_sent(row_id)
