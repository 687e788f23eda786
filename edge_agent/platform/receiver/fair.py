"""The receiver's inbound queue, fair between agents: one agent flooding cannot delay another's messages.

paho hands every message over in the order the broker sent it; one FIFO would make an honest agent's chunk wait
behind everything a flooding agent sent before it. Here each agent has its own queue, taken round-robin, within a
share of messages and bytes per agent; a message beyond its agent's share is refused (the caller PUBACKs and drops
it: no ack has named it, so the agent sends it again when asked, after its ack timeout). Every ack states the share
(`max_queued`, `max_queued_bytes`) and agents keep their window within it, so only a flood or an older agent with a
larger window reaches it. Beyond the total, `put` waits: backpressure to the broker, as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Any


class FairQueue:
    def __init__(self, *, agent_messages: int, agent_bytes: int, total_bytes: int):
        self.agent_messages, self.agent_bytes, self.total_bytes = agent_messages, agent_bytes, total_bytes
        self._queues: OrderedDict[str, deque[tuple[Any, int]]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._total = 0
        self._cond = threading.Condition()

    def put(self, agent: str, item: Any, size: int, stop: threading.Event) -> bool:
        """Queue `item` (`size` bytes) for `agent`; False if that agent is over its share (nothing queued).
        Waits while the queue as a whole is full, until `stop` is set (then False)."""
        with self._cond:
            queue = self._queues.get(agent)
            if queue and (len(queue) >= self.agent_messages or self._bytes[agent] + size > self.agent_bytes):
                return False
            while self._total and self._total + size > self.total_bytes:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self._queues.setdefault(agent, deque()).append((item, size))
            self._bytes[agent] = self._bytes.get(agent, 0) + size
            self._total += size
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> Any | None:
        """The next item, each agent in turn; None after `timeout` s with nothing queued."""
        with self._cond:
            if not self._queues and not self._cond.wait_for(lambda: self._queues, timeout):
                return None
            agent, queue = next(iter(self._queues.items()))
            item, size = queue.popleft()
            self._bytes[agent] -= size
            if queue:
                self._queues.move_to_end(agent)
            else:
                del self._queues[agent], self._bytes[agent]
            self._total -= size
            self._cond.notify_all()
            return item
