"""`edge-agent receiver run`: the reference receiver (central side of the wire protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_agent import services
from edge_agent.cli.app import app, fail, options
from edge_agent.config import ConfigError, load_receiver_config

receiver_app = typer.Typer(no_args_is_help=True, help="The reference receiver: verify, store and ack agents' files.")
app.add_typer(receiver_app, name="receiver")


@receiver_app.command("run")
def receiver_run(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="receiver.toml ([mqtt] and [receiver])")]
    = None,
) -> None:
    """Run a receiver until SIGTERM. Several may share one store and a shared subscription."""
    path = config or options(ctx).config_path
    try:
        cfg = load_receiver_config(path)
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise
    services.receiver.serve(cfg)
