"""What the CLI (and later the status page) calls: one module per use-case area, each function taking a
`Workspace` (or the config) and returning frozen dataclasses whose `as_dict()` is the `--json` form.

Services know nothing of terminals: no rich, no typer, no exit codes but `ServiceError.code`. They raise
`ServiceError` for a request they refuse, with a message that says what to do instead.
"""

from edge_agent.services import (
    alarms,
    audit,
    cameras,
    custody,
    devices,
    export,
    files,
    fleet,
    holds,
    keys,
    receiver,
    status,
    sync,
    verify,
)
from edge_agent.services.workspace import NoCatalog, ServiceError, Workspace

__all__ = ["NoCatalog", "ServiceError", "Workspace", "alarms", "audit", "cameras", "custody", "devices", "export",
           "files", "fleet", "holds", "keys", "receiver", "status", "sync", "verify"]
