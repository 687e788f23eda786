"""Core custodian commands: run, status, devices, files, import, verify, audit, keys, config check."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from edge_agent.catalog import Catalog, UnknownFile
from edge_agent.catalog import audit as audit_log
from edge_agent.cli.app import app, console, emit, fail, fmt_bytes, fmt_ms, load, options, table
from edge_agent.config import ConfigError, load_config
from edge_agent.evidence.manifest import AgentKey, begin_rotation, finish_rotation
from edge_agent.evidence.verify import verify_all
from edge_agent.layout import StoreLayout
from edge_agent.services.intake import IntakeRefused, import_folder

files_app = typer.Typer(no_args_is_help=True, help="List and inspect collected files.")
audit_app = typer.Typer(no_args_is_help=True, help="Read and check the tamper-evident audit log.")
keys_app = typer.Typer(no_args_is_help=True, help="The agent's signing key.")
config_app = typer.Typer(no_args_is_help=True, help="Check a configuration file.")
app.add_typer(files_app, name="files")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

Reason = Annotated[str | None, typer.Option("--reason", "-r", help="why you are doing this (audit log)")]


def open_catalog(ctx: typer.Context) -> tuple[Catalog, StoreLayout]:
    cfg = load(ctx)
    if not cfg.catalog_path.exists():
        fail(f"no catalog at {cfg.catalog_path}: the agent has not run with this config yet (edge-agent run)")
    return Catalog(cfg.catalog_path), StoreLayout(cfg.agent.data_dir)


@app.command()
def run(ctx: typer.Context) -> None:
    """Run the agent daemon (systemd starts this)."""
    from edge_agent.daemon import build_agent

    cfg = load(ctx)
    try:
        agent = build_agent(cfg)
    except (PermissionError, ConfigError) as exc:
        fail(str(exc), code=2)
    agent.run_forever()


@app.command()
def status(ctx: typer.Context) -> None:
    """What is collected, what waits, what is wrong."""
    catalog, _layout = open_catalog(ctx)
    counts = catalog.counts_by_state()
    oldest = catalog.query("SELECT MIN(created_ms), COUNT(*), COALESCE(SUM(COALESCE(size, source_size)),0)"
                           " FROM files WHERE state IN ('discovered','staged','sealed','sending')")[0]
    alarms = catalog.active_alarms()
    data = {
        "files_by_state": counts,
        "unsynced": {"files": oldest[1], "bytes": oldest[2],
                     "oldest_age_s": None if oldest[0] is None else int(time.time() - oldest[0] / 1000)},
        "alarms": [{"kind": a["kind"], "subject": a["subject"], "message": a["message"],
                    "raised": fmt_ms(a["raised_ms"])} for a in alarms],
        "last_sync_ms": catalog.query("SELECT MAX(synced_ms) FROM files")[0][0],
    }
    from edge_agent.cli.operations import daemon_view, render_daemon  # the running daemon's live view

    data["daemon"] = daemon_view(load(ctx))
    if options(ctx).json:
        emit(ctx, data)
        return
    console.print(table("Files by state", ["state", "files"], [[state, n] for state, n in sorted(counts.items())]))
    console.print(render_daemon(data["daemon"]))
    age = data["unsynced"]["oldest_age_s"]
    console.print(f"Waiting for the platform: {oldest[1]} files, {fmt_bytes(oldest[2])}"
                  + (f", oldest {age // 3600} h {age % 3600 // 60} min" if age is not None else ""))
    if alarms:
        console.print(table("Active alarms", ["kind", "subject", "since", "message"],
                            [[a["kind"], a["subject"], fmt_ms(a["raised_ms"]), a["message"]] for a in alarms]))
    else:
        console.print("[green]No active alarms.[/green]")


devices_app = typer.Typer(help="Recorders and cameras: list (default), gaps, locations, discover.")
app.add_typer(devices_app, name="devices")


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context) -> None:
    """Recorders and cameras this agent has seen, with their custody."""
    if ctx.invoked_subcommand is None:
        devices_list(ctx)


@devices_app.command("list")
def devices_list(ctx: typer.Context) -> None:
    """Recorders and cameras this agent has seen, with their custody."""
    catalog, _ = open_catalog(ctx)
    rows = catalog.query(
        "SELECT d.*, (SELECT officer_id FROM checkouts c WHERE c.device_id = d.device_id AND c.to_ms IS NULL"
        " ORDER BY from_ms DESC LIMIT 1) AS officer, (SELECT COUNT(*) FROM files f WHERE f.device_id = d.device_id)"
        " AS files FROM devices d ORDER BY d.kind, d.device_id")
    data = [{k: r[k] for k in r.keys()} for r in rows]
    emit(ctx, data, table("Devices", ["device", "kind", "model", "serial", "checked out to", "files", "last seen"],
                          [[r["device_id"], r["kind"], r["model"], r["serial"], r["officer"], r["files"],
                            fmt_ms(r["last_seen_ms"])] for r in rows]))


@files_app.command("list")
def files_list(
    ctx: typer.Context,
    state: Annotated[list[str] | None, typer.Option("--state", "-s", help="only these states")] = None,
    device: Annotated[str | None, typer.Option("--device", "-d")] = None,
    case: Annotated[str | None, typer.Option("--case")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 100,
) -> None:
    """Collected files, newest first."""
    catalog, _ = open_catalog(ctx)
    where, params = [], []
    if device:
        where.append("device_id = ?")
        params.append(device)
    if case:
        where.append("case_id = ?")
        params.append(case)
    records = catalog.files(states=state or None, where=" AND ".join(where), params=tuple(params),
                            order="created_ms DESC, file_id DESC", limit=limit)
    emit(ctx, [r.as_dict() for r in records],
         table(f"Files ({len(records)} shown)", ["file id", "state", "device", "officer", "recorded", "size", "path"],
               [[r.file_id, r.state, r.device_id, r.officer_id, fmt_ms(r.recorded_start_ms),
                 fmt_bytes(r.size or r.source_size), r.original_path] for r in records]))


@files_app.command("show")
def files_show(ctx: typer.Context, file_id: str, reason: Reason = None) -> None:
    """One file: its catalog row, its manifest and its history."""
    catalog, layout = open_catalog(ctx)
    try:
        record = catalog.get(file_id)
    except UnknownFile as exc:
        fail(str(exc))
        raise
    catalog.audit("files.show", subject=file_id, reason=reason)
    manifest_path = layout.manifest_path(file_id)
    manifest = json.loads(manifest_path.read_bytes()) if manifest_path.exists() else None
    history = [{"ts": fmt_ms(h["ts_ms"]), "actor": h["actor"], "action": h["action"], "reason": h["reason"]}
               for h in catalog.query("SELECT * FROM audit WHERE subject = ? ORDER BY seq", (file_id,))]
    data = {"file": record.as_dict(), "manifest": manifest, "history": history}
    if options(ctx).json:
        emit(ctx, data)
        return
    console.print(table(f"File {file_id}", ["field", "value"], [[k, v] for k, v in record.as_dict().items()]))
    console.print(table("History", ["time", "actor", "action", "reason"],
                        [[h["ts"], h["actor"], h["action"], h["reason"]] for h in history]))


@app.command("import")
def import_path(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="a card's mount point or a folder of recordings")],
    device: Annotated[str, typer.Option("--device", "-d", help="the recorder's device id")],
    officer: Annotated[str | None, typer.Option("--officer", "-o", help="officer id (else from names/checkout)")]
    = None,
    reason: Reason = None,
) -> None:
    """Bring in files from a card or folder, tagged, hashed and sealed as a dock would."""
    cfg = load(ctx)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=console, disable=options(ctx).json) as progress:
            task = progress.add_task(f"import {path.name}", total=None)
            result = import_folder(cfg, path, device_id=device, officer_id=officer, reason=reason,
                                   on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                   total=total or None))
    except IntakeRefused as exc:
        fail(str(exc))
        raise
    except PermissionError as exc:
        fail(str(exc), code=2)
        raise
    data = {"session_id": result.session_id, "device_id": device, "files": result.files_total,
            "sealed": result.files_done, "bytes": result.bytes_copied, "error": result.error}
    emit(ctx, data, f"Imported {result.files_done}/{result.files_total} files ({fmt_bytes(result.bytes_copied)}) "
                    f"from {path} as {device}; session {result.session_id}")
    if result.files_missing:
        fail(f"{result.files_missing} file(s) not imported: {result.error}")


@app.command()
def verify(
    ctx: typer.Context,
    file_ids: Annotated[list[str] | None, typer.Argument(help="files to check (default: --all)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every stored file, the document chain and the audit log")]
    = False,
    reason: Reason = None,
) -> None:
    """Re-hash stored files, check every manifest signature and both chains. Exit 1 on any mismatch."""
    catalog, layout = open_catalog(ctx)
    key = AgentKey.load_or_create(layout.keys)
    catalog.audit("verify", subject=",".join(file_ids) if file_ids else "all", reason=reason)
    checked = 0

    def tick(_record: object) -> None:
        nonlocal checked
        checked += 1

    try:
        findings = verify_all(catalog, layout, key, file_ids if file_ids and not all_ else None, progress=tick)
    except UnknownFile as exc:
        fail(str(exc))
        raise
    data = {"checked_files": checked, "ok": not findings, "findings": [f.__dict__ for f in findings]}
    if findings:
        catalog.raise_alarm(f"tamper:verify:{int(time.time())}", "tamper", "verify",
                            f"verify found {len(findings)} problem(s); first: {findings[0]}")
    human = table(f"verify: {checked} files checked, {len(findings)} problem(s)", ["subject", "what", "problem"],
                  [[f.subject, f.what, f.message] for f in findings]) if findings else (
        f"[green]OK[/green]: {checked} files, their manifests, the document chain and the audit log verify.")
    emit(ctx, data, human)
    if findings:
        raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    ctx: typer.Context,
    subject: Annotated[str | None, typer.Option("--subject", help="only entries about this file or device")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 50,
) -> None:
    """The newest audit entries."""
    catalog, _ = open_catalog(ctx)
    sql = "SELECT * FROM audit" + (" WHERE subject = ?" if subject else "") + " ORDER BY seq DESC LIMIT ?"
    rows = catalog.query(sql, (subject, limit) if subject else (limit,))
    data = [{k: r[k] for k in r.keys()} for r in rows]
    emit(ctx, data, table("Audit log", ["seq", "time", "actor", "action", "subject", "reason"],
                          [[r["seq"], fmt_ms(r["ts_ms"]), r["actor"], r["action"], r["subject"], r["reason"]]
                           for r in rows]))


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Check the audit log's hash chain. Exit 1 if any entry was edited, deleted or reordered."""
    catalog, _ = open_catalog(ctx)
    count, problems = audit_log.verify(catalog.conn)
    data = {"entries": count, "ok": not problems, "problems": [str(p) for p in problems]}
    emit(ctx, data, "\n".join(f"[red]{p}[/red]" for p in problems) if problems
         else f"[green]OK[/green]: {count} audit entries, chain intact.")
    if problems:
        raise typer.Exit(1)


@keys_app.command("show")
def keys_show(ctx: typer.Context) -> None:
    """The agent's key id and public key (enrol it on the platform)."""
    cfg = load(ctx)
    layout = StoreLayout(cfg.agent.data_dir)
    layout.create()
    key = AgentKey.load_or_create(layout.keys)
    data = {"agent_id": cfg.agent.id, "key_id": key.key_id, "public_key_pem": key.public_pem(),
            "public_key_b64": key.public_raw_b64()}
    emit(ctx, data, f"agent {cfg.agent.id}\nkey id {key.key_id}\n{key.public_pem()}")


@keys_app.command("rotate")
def keys_rotate(ctx: typer.Context, reason: Reason = None) -> None:
    """Replace the signing key. The old key signs a `key_rotation` document naming the new one, so the
    chain of trust continues; its public half stays in keys/retired/ so earlier documents still verify.
    Enrol the new public key on the platform, then restart the agent."""
    from edge_agent.ingest import Sealer

    cfg = load(ctx)
    if not reason:
        fail("say why the key is rotated: --reason (it goes into the signed rotation record and the audit log)")
    catalog, layout = open_catalog(ctx)
    old, new = begin_rotation(layout.keys)
    body = {"old_key_id": old.key_id, "new_key_id": new.key_id, "new_public_key": new.public_pem(),
            "reason": reason, "by": audit_log.os_user()}
    path = layout.data_dir / "rotations" / f"{new.key_id.split(':', 1)[1]}.json"
    Sealer(catalog, old, layout, cfg).sign_document("key_rotation", new.key_id, body, path)
    finish_rotation(layout.keys)
    catalog.audit("keys.rotated", subject=new.key_id, reason=reason, detail={"old_key_id": old.key_id})
    emit(ctx, {"old_key_id": old.key_id, "key_id": new.key_id, "public_key_pem": new.public_pem()},
         f"new key {new.key_id} (was {old.key_id}); enrol it on the platform, then restart the agent:\n"
         f"{new.public_pem()}")


@config_app.command("check")
def config_check(ctx: typer.Context, file: Annotated[Path | None, typer.Argument()] = None) -> None:
    """Validate a config file: every problem with its key, value and what is valid; exit 2 if any."""
    path = file or options(ctx).config_path
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        emit(ctx, {"ok": False, "path": str(path), "problems": [p.__dict__ | {"value": repr(p.value)}
                                                                  for p in exc.problems]},
             f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    emit(ctx, {"ok": True, "path": str(path), "agent": cfg.agent.id, "docks": len(cfg.docks),
               "cameras": len(cfg.cameras)},
         f"[green]OK[/green]: {path} (agent {cfg.agent.id}, {len(cfg.docks)} docks, {len(cfg.cameras)} cameras)")
