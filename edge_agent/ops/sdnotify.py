"""The agent's systemd watchdog ping: withheld while any component is stalled (ops/liveness.py).

The notify protocol itself (`notify`, `watchdog_interval_s`) lives in protocol/sdnotify.py, shared with the
receiver.
"""

from __future__ import annotations

import logging

from edge_agent.protocol.sdnotify import notify, watchdog_interval_s

__all__ = ["notify", "ping_watchdog", "watchdog_interval_s"]

log = logging.getLogger(__name__)


def ping_watchdog(stalled: dict[str, str]) -> bool:
    """The watchdog ping, withheld while any component is `stalled` (name -> why, from ops/liveness.py): then
    systemd restarts the daemon after WatchdogSec, and STATUS= says which part stalled. True if pinged."""
    if stalled:
        names = ", ".join(f"{name} ({why})" for name, why in sorted(stalled.items()))
        log.error("watchdog not fed: stalled components: %s", names)
        notify(f"STATUS=stalled: {names[:400]}")
        return False
    return notify("WATCHDOG=1")
