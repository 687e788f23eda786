"""`edge-agent sync now`: send what waits without waiting out the reconnect backoff."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from edge_agent.catalog import State, audit
from edge_agent.cli.app import app, emit, fmt_bytes
from edge_agent.cli.evidence import Reason, open_catalog
from edge_agent.clock import now_ms
from edge_agent.sync import SYNC_NOW_META

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
    catalog, _layout = open_catalog(ctx)
    retried: list[str] = []
    if retry_rejected:
        for record in catalog.files(states=[State.REJECTED]):
            # Rejected by the receiver: sealed, send again. Rejected before sealing: copy it again.
            target = State.SEALED if record.manifest_sha256 else State.DISCOVERED
            catalog.transition(record.file_id, target, expect=State.REJECTED,
                               reason=reason or "custodian retried a rejected file (sync now --retry-rejected)",
                               audit_detail={"previous_error": record.last_error})
            retried.append(record.file_id)
    with catalog.transaction() as conn:
        catalog.meta_set(conn, SYNC_NOW_META, str(now_ms()))
        audit.append(conn, "sync.now", reason=reason, detail={"retry_rejected": retried})

    def waiting() -> tuple[int, int]:
        files, size = catalog.query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files"
                                    " WHERE state IN ('sealed', 'sending')")[0]
        return int(files), int(size)

    files, size = waiting()
    deadline = time.monotonic() + wait
    while files and time.monotonic() < deadline:
        time.sleep(0.5)
        files, size = waiting()
    data = {"retried": retried, "waiting_files": files, "waiting_bytes": size,
            "rejected": len(catalog.files(states=[State.REJECTED]))}
    human = (f"Asked the agent to sync now. {len(retried)} rejected file(s) queued again. "
             f"Waiting to be sent: {files} file(s), {fmt_bytes(size)}.")
    emit(ctx, data, human)
    if wait and files:
        raise typer.Exit(1)
