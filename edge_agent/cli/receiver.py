"""`edge-agent receiver run`: the reference receiver (central side of the wire protocol); `receiver fsck`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_agent import services
from edge_agent.cli.app import app, emit, fail, options, table
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


@receiver_app.command("fsck")
def receiver_fsck(
    ctx: typer.Context,
    store: Annotated[Path, typer.Option("--store", help="the receiver's store_dir")],
    repair: Annotated[bool, typer.Option("--repair", help="repair what is found (objects are quarantined)")]
    = False,
) -> None:
    """Check a receiver store (stop its receivers first); exit 1 if anything is left to repair."""
    result = services.receiver.fsck(store, repair=repair)
    rows = [[f["kind"], f["path"], "yes" if f["repaired"] else "no", f["detail"]] for f in result.findings]
    verdict = ("clean" if not rows else "repaired") if result.clean else "problems found: run with --repair"
    human = table(f"receiver store {result.store}: {result.objects_checked} object(s) checked, {verdict}",
                  ["finding", "path", "repaired", "detail"], rows)
    emit(ctx, result.as_dict(), human)
    if not result.clean:
        raise typer.Exit(1)
