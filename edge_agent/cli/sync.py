"""`edge-agent sync now`: send what waits without waiting out the reconnect backoff."""

from __future__ import annotations

from typing import Annotated

import typer

from edge_agent import services
from edge_agent.cli.app import app, emit, fmt_bytes, workspace
from edge_agent.cli.evidence import Reason
from edge_agent.i18n import _

sync_app = typer.Typer(no_args_is_help=True, help="The uplink to the platform.")
app.add_typer(sync_app, name="sync")


@sync_app.command("now")
def sync_now(
    ctx: typer.Context,
    retry_rejected: Annotated[bool, typer.Option("--retry-rejected", help="send files the platform rejected "
                                                 "again (after you found and fixed the cause)")] = False,
    wait: Annotated[float, typer.Option("--wait", help="wait up to this many seconds for the queue to empty")]
    = 0.0,
    reason: Reason = None,
) -> None:
    """Tell the running agent to reconnect and send now; optionally retry rejected files. Audited."""
    done = services.sync.sync_now(workspace(ctx), retry_rejected=retry_rejected, wait_s=wait, reason=reason)
    waiting = done.waiting
    human = _("Asked the agent to sync now. {retried} rejected file(s) queued again. "
              "Waiting to be sent: {files} file(s), {size}.").format(retried=len(done.retried), files=waiting.files,
                                                                      size=fmt_bytes(waiting.bytes))
    emit(ctx, done.as_dict(), human)
    if wait and waiting.files:
        raise typer.Exit(1)
