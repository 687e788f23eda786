"""The status page at the dock (issue 15): a read-only web page the daemon serves, live over server-sent events,
in the custodian's language. `page` is the ASGI app, `server` the daemon's part that runs it."""

from edge_agent.ui.server import StatusPage

__all__ = ["StatusPage"]
