"""`edge-agent` console script. Importing a command module registers its commands."""

from edge_agent.cli import (
    cameras,  # noqa: F401
    evidence,  # noqa: F401
    fleet,  # noqa: F401
    operations,  # noqa: F401
    receiver,  # noqa: F401
    sync,  # noqa: F401
)
from edge_agent.cli.app import app, main

__all__ = ["app", "main"]
