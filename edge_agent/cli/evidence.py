"""Core custodian commands: run, status, devices, files, import, verify, audit, keys, config check."""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from edge_agent import services
from edge_agent.cli.app import (
    app,
    console,
    emit,
    fail,
    fmt_bytes,
    fmt_ms,
    load,
    options,
    state_word,
    table,
    workspace,
)
from edge_agent.cli.operations import render_daemon
from edge_agent.config import ConfigError, load_config
from edge_agent.i18n import N_, _
from edge_agent.services.intake import import_folder

files_app = typer.Typer(no_args_is_help=True, help="List and inspect collected files.")
audit_app = typer.Typer(no_args_is_help=True, help="Read and check the tamper-evident audit log.")
keys_app = typer.Typer(no_args_is_help=True, help="The agent's signing key.")
config_app = typer.Typer(no_args_is_help=True, help="Check a configuration file.")
app.add_typer(files_app, name="files")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(config_app, name="config")

Reason = Annotated[str | None, typer.Option("--reason", "-r", help="why you are doing this (audit log)")]

KINDS = {"recorder": N_("recorder"), "camera": N_("camera")}   # devices list: the kind in the custodian's words


@app.command()
def run(ctx: typer.Context) -> None:
    """Run the agent daemon (systemd starts this)."""
    from edge_agent.daemon import DataDirOwned, build_agent

    cfg = load(ctx)
    try:
        agent = build_agent(cfg)
    except (PermissionError, ConfigError, DataDirOwned) as exc:
        fail(str(exc), code=2)
    agent.run_forever()


@app.command()
def status(ctx: typer.Context) -> None:
    """What is collected, what waits, what is wrong."""
    report = services.status.status(workspace(ctx))
    alarms = report.alarms
    if options(ctx).json:
        # Alarm times in local time, as the table shows them.
        emit(ctx, {**report.as_dict(), "alarms": [{"kind": a.kind, "subject": a.subject, "message": a.message,
                                                   "raised": fmt_ms(a.raised_ms)} for a in alarms]})
        return
    counts, unsynced = report.files_by_state, report.unsynced
    console.print(table(_("Files by state"), [_("state"), _("files")],
                        [[state_word(state), n] for state, n in sorted(counts.items())]))
    console.print(render_daemon(report.daemon))
    age = report.oldest_unsynced_age_s
    console.print(_("Waiting for the platform: {files} files, {size}").format(files=unsynced.files,
                                                                              size=fmt_bytes(unsynced.bytes))
                  + (_(", oldest {hours} h {minutes} min").format(hours=age // 3600, minutes=age % 3600 // 60)
                     if age is not None else ""))
    chain = report.chain
    if chain["receipted_seq"] is None:
        console.print(_("Document chain: {documents} documents; no chain receipt from the platform yet").format(
            documents=chain["head_seq"]))
    else:
        console.print(_("Document chain: {documents} documents; the platform holds it up to {seq} (receipted "
                        "{time}), last checkpoint {checkpoint} at {checkpoint_seq}").format(
            documents=chain["head_seq"], seq=chain["receipted_seq"], time=fmt_ms(chain["receipted_ms"]),
            checkpoint=chain["checkpoint_id"] or "-", checkpoint_seq=chain["checkpoint_seq"] or "-"))
    if alarms:
        console.print(table(_("Active alarms"), [_("kind"), _("subject"), _("since"), _("message")],
                            [[a.kind, a.subject, fmt_ms(a.raised_ms), services.alarms.for_user(a)] for a in alarms],
                            drop=[_("since"), _("subject")], wrap=[_("message")]))
    else:
        console.print("[green]" + _("No active alarms.") + "[/green]")


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
    rows = services.devices.devices(workspace(ctx))
    emit(ctx, [r.as_dict() for r in rows],
         table(_("Devices"), [_("device"), _("kind"), _("model"), _("serial"), _("checked out to"), _("files"),
                              _("last seen")],
               [[r.device_id, _(KINDS.get(r.kind, r.kind)), r.model, r.serial, r.officer, r.files,
                 fmt_ms(r.last_seen_ms)] for r in rows],
               drop=[_("serial"), _("last seen"), _("model"), _("kind")]))


def parse_since(text: str | None) -> int | None:
    """`--since`: a local date or time (2026-11-22, 2026-11-22T08:00) or an age (90m, 24h, 7d)."""
    if text is None:
        return None
    age = re.fullmatch(r"(\d+)\s*([mhd])", text.strip())
    if age:
        unit = {"m": "minutes", "h": "hours", "d": "days"}[age.group(2)]
        moment = datetime.now().astimezone() - timedelta(**{unit: int(age.group(1))})
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            fail(_("--since {value!r} is neither a time (2026-11-22T08:00) nor an age (24h, 7d)").format(value=text))
            raise
    return int(moment.astimezone().timestamp() * 1000)


@files_app.command("list")
def files_list(
    ctx: typer.Context,
    state: Annotated[list[str] | None, typer.Option(
        "--state", "-s",
        help="only these states: discovered, staged, sealed, sending, synced, source_cleared, purged, rejected",
    )] = None,
    device: Annotated[str | None, typer.Option("--device", "-d")] = None,
    case: Annotated[str | None, typer.Option("--case")] = None,
    since: Annotated[str | None, typer.Option("--since", help="collected since a time or an age (24h, 7d)")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="at most this many (newest first)")] = 50,
    cursor: Annotated[str | None, typer.Option("--cursor", help="the next page: the next_cursor of --json")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every file, no limit")] = False,
) -> None:
    """Collected files, newest first: a page of --limit, with the total and how to see more."""
    found = services.files.page(workspace(ctx), states=state, device_id=device, case_id=case,
                                since_ms=parse_since(since), limit=None if all_ else limit, cursor=cursor)
    if options(ctx).json:
        sys.stdout.write(json.dumps(found.as_dict(), ensure_ascii=False, indent=2, default=str) + "\n")
        return
    records = found.files
    console.print(table(_("Files ({shown} of {total})").format(shown=len(records), total=found.total),
                        [_("file id"), _("state"), _("device"), _("officer"), _("recorded"), _("size"), _("path")],
                        [[found.short_ids[r.file_id], state_word(r.state), r.device_id, r.officer_id,
                          fmt_ms(r.recorded_start_ms), fmt_bytes(r.size or r.source_size), r.original_path]
                         for r in records],
                        drop=[_("path"), _("officer"), _("size"), _("recorded"), _("device")]))
    if found.next_cursor:
        console.print(_("Stopped at the limit of {limit}: {left} more. Next page: --cursor {cursor} "
                        "(or --limit, --since, --state, --all)").format(limit=found.limit,
                                                                        left=found.total - len(records),
                                                                        cursor=found.next_cursor),
                      soft_wrap=False)


@files_app.command("show")
def files_show(ctx: typer.Context, file_id: str, reason: Reason = None) -> None:
    """One file: its catalog row, its manifest and its history (a unique start of its id will do)."""
    detail = services.files.show(workspace(ctx), file_id, reason=reason)
    history = [{"ts": fmt_ms(h.ts_ms), "actor": h.actor, "action": h.action, "reason": h.reason}
               for h in detail.history]
    if options(ctx).json:
        emit(ctx, {"file": detail.file.as_dict(), "manifest": detail.manifest, "history": history,
                   "receipt": detail.receipt, "receipt_verifies": detail.receipt is not None
                   and detail.receipt_problem is None, "receipt_problem": detail.receipt_problem})
        return
    console.print(table(_("File {file_id}").format(file_id=detail.file.file_id), [_("field"), _("value")],
                        [[k, v] for k, v in detail.file.as_dict().items()]))
    if detail.receipt is not None:
        receipt = detail.receipt
        console.print(table(_("Platform receipt"), [_("field"), _("value")], [
            [_("verifies"), _("yes") if detail.receipt_problem is None
             else _("NO: {problem}").format(problem=detail.receipt_problem)],
            [_("receiver key"), receipt.get("key_id")], [_("verdict"), receipt.get("verdict")],
            [_("stored"), fmt_ms(receipt.get("stored_ms"))], ["sha256", receipt.get("sha256")],
            [_("manifest sha256"), receipt.get("manifest_sha256")]]))
    console.print(table(_("History"), [_("time"), _("actor"), _("action"), _("reason")],
                        [[h["ts"], h["actor"], h["action"], h["reason"]] for h in history],
                        drop=[_("reason"), _("actor")]))


def folder_bytes(path: Path) -> int | None:
    """The size of the regular files under `path` (None if it cannot be walked: the import will say why)."""
    try:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    except OSError:
        return None


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
            # The folder's size until the first pass counts what will be taken: a known total from the start.
            task = progress.add_task(_("import {name}").format(name=path.name), total=folder_bytes(path))
            result = import_folder(cfg, path, device_id=device, officer_id=officer, reason=reason,
                                   on_progress=lambda done, total: progress.update(task, completed=done,
                                                                                   total=total or None))
    except PermissionError as exc:
        fail(str(exc), code=2)
        raise
    data = {"session_id": result.session_id, "device_id": device, "files": result.files_total,
            "sealed": result.files_done, "bytes": result.bytes_copied, "error": result.error}
    emit(ctx, data, _("Imported {done}/{total} files ({size}) from {path} as {device}; session {session}").format(
        done=result.files_done, total=result.files_total, size=fmt_bytes(result.bytes_copied), path=path,
        device=device, session=result.session_id))
    if result.files_missing:
        fail(_("{missing} file(s) not imported: {error}").format(missing=result.files_missing, error=result.error))


@app.command()
def verify(
    ctx: typer.Context,
    file_ids: Annotated[list[str] | None, typer.Argument(help="files to check (default: --all)")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every stored file, the document chain and the audit log")]
    = False,
    reason: Reason = None,
    bag: Annotated[Path | None, typer.Option("--bag", help="an exported bag: check it from its own files alone")]
    = None,
) -> None:
    """Re-hash stored files, check every manifest signature and both chains; or (--bag) an exported bag from
    its own files alone. Exit 1 on any mismatch."""
    if bag is not None:
        checked = services.verify.verify_bag(bag)
        emit(ctx, checked.as_dict(), table(_("bag {bag}: {problems} problem(s)").format(
            bag=bag, problems=len(checked.problems)), [_("problem")], [[p] for p in checked.problems])
             if checked.problems else "[green]OK[/green]: " + _(
                 "bag {bag} verifies from its own files (BagIt, key history, signatures, media).").format(bag=bag))
        if not checked.ok:
            raise typer.Exit(1)
        return
    report = services.verify.verify(workspace(ctx), None if all_ else file_ids, reason=reason)
    checked, findings = report.checked_files, report.findings
    human = table(_("verify: {checked} files checked, {problems} problem(s)").format(
        checked=checked, problems=len(findings)), [_("subject"), _("what"), _("problem")],
        [[f.subject, f.what, f.message] for f in findings]) if findings else (
        "[green]OK[/green]: " + _("{checked} files, their manifests, the document chain and the audit log "
                                  "verify.").format(checked=checked))
    emit(ctx, report.as_dict(), human)
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("show")
def audit_show(
    ctx: typer.Context,
    subject: Annotated[str | None, typer.Option("--subject", help="only entries about this file or device")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 50,
) -> None:
    """The newest audit entries."""
    rows = services.audit.entries(workspace(ctx), subject=subject, limit=limit)
    emit(ctx, [r.as_dict() for r in rows],
         table(_("Audit log"), [_("seq"), _("time"), _("actor"), _("action"), _("subject"), _("reason")],
               [[r.seq, fmt_ms(r.ts_ms), r.actor, r.action, r.subject, r.reason] for r in rows]))


@audit_app.command("verify")
def audit_verify(ctx: typer.Context) -> None:
    """Check the audit log's hash chain. Exit 1 if any entry was edited, deleted or reordered."""
    check = services.audit.check_chain(workspace(ctx))
    emit(ctx, check.as_dict(), "\n".join(f"[red]{p}[/red]" for p in check.problems) if check.problems
         else "[green]OK[/green]: " + _("{entries} audit entries, chain intact.").format(entries=check.entries))
    if not check.ok:
        raise typer.Exit(1)


@keys_app.command("show")
def keys_show(ctx: typer.Context) -> None:
    """The agent's key id and public key (enrol it on the platform)."""
    key = services.keys.show(workspace(ctx))
    emit(ctx, key.as_dict(), _("agent {agent}\nkey id {key_id} ({suite})").format(
        agent=key.agent_id, key_id=key.key_id, suite=key.suite) + f"\n{key.public_key_pem}")


@keys_app.command("rotate")
def keys_rotate(ctx: typer.Context, reason: Reason = None) -> None:
    """Replace the signing key. The old key signs a `key_rotation` document naming and carrying the new one,
    so the chain of trust continues from the first key. A running daemon does it and signs with the new key
    at once; the platform learns the new key from the rotation document."""
    rotation = services.keys.rotate(workspace(ctx), reason=reason)
    signer = _("the running daemon signs with it now") if rotation.via == "daemon" else _("the agent signs with it")
    emit(ctx, rotation.as_dict(),
         _("new key {key_id} (was {old_key_id}); {signer}. The platform learns it from the signed rotation "
           "document (no re-enrolment):").format(key_id=rotation.key_id, old_key_id=rotation.old_key_id,
                                                 signer=signer) + f"\n{rotation.public_key_pem}")


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
         "[green]OK[/green]: " + _("{path} (agent {agent}, {docks} docks, {cameras} cameras)").format(
             path=path, agent=cfg.agent.id, docks=len(cfg.docks), cameras=len(cfg.cameras)))
