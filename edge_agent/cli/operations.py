"""Operations commands: holds, custody (assign/return/tag), export, view, alarms, and the daemon's live view."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.text import Text

from edge_agent.catalog import Catalog, UnknownFile, audit
from edge_agent.cli.app import app, emit, fail, fmt_bytes, fmt_ms, load, table
from edge_agent.config import AgentConfig
from edge_agent.evidence.custody import CustodyError, assign, backfill_officer, return_device, tag
from edge_agent.evidence.export import ExportError, export_case
from edge_agent.evidence.manifest import AgentKey
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from edge_agent.ops.alarms import clear_by_custodian
from edge_agent.ops.health import read_health_file
from edge_agent.ops.retention import RETENTION_CLASSES, HoldError, active_holds, place_hold, release_hold

alarms_app = typer.Typer(no_args_is_help=True, help="Active alarms: list them, clear one you dealt with.")
app.add_typer(alarms_app, name="alarms")

Reason = Annotated[str, typer.Option("--reason", "-r", help="why (written to the audit log)")]
OptionalReason = Annotated[str | None, typer.Option("--reason", "-r", help="why (written to the audit log)")]
Case = Annotated[str | None, typer.Option("--case", help="a case number: every file tagged with it")]


def _catalog(ctx: typer.Context) -> tuple[AgentConfig, Catalog, StoreLayout]:
    cfg = load(ctx)
    if not cfg.catalog_path.exists():
        fail(f"no catalog at {cfg.catalog_path}: the agent has not run with this config yet (edge-agent run)")
    return cfg, Catalog(cfg.catalog_path), StoreLayout(cfg.agent.data_dir)


def _when(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--at {text!r} is not a time; write it like 2026-11-22T08:00 (local time) or with +08:00")
        raise
    return int(moment.astimezone().timestamp() * 1000)


# -- holds -------------------------------------------------------------------------------------------


@app.command()
def hold(
    ctx: typer.Context,
    file_id: Annotated[str | None, typer.Argument(help="the file to keep (or use --case)")] = None,
    case: Case = None,
    reason: Reason = "",
) -> None:
    """Keep a file, or every file of a case, from being purged until released."""
    _, catalog, _ = _catalog(ctx)
    try:
        hold_id = place_hold(catalog, reason=reason, file_id=file_id, case_id=case)
    except (HoldError, UnknownFile) as exc:
        fail(str(exc))
        raise
    subject = file_id or f"case {case}"
    emit(ctx, {"hold_id": hold_id, "file_id": file_id, "case_id": case, "reason": reason},
         f"Held {subject} (hold {hold_id}): it will not be purged until released.")


@app.command()
def release(
    ctx: typer.Context,
    file_id: Annotated[str | None, typer.Argument(help="the file to release (or use --case)")] = None,
    case: Case = None,
    reason: Reason = "",
) -> None:
    """Release the holds on a file or a case. Releasing a case ends its files' evidence class."""
    _, catalog, _ = _catalog(ctx)
    try:
        released, reclassified = release_hold(catalog, reason=reason, file_id=file_id, case_id=case)
    except (HoldError, UnknownFile) as exc:
        fail(str(exc))
        raise
    emit(ctx, {"released_holds": released, "reclassified_routine": reclassified, "file_id": file_id,
               "case_id": case},
         f"Released {released} hold(s) on {file_id or 'case ' + str(case)}"
         + (f"; {reclassified} evidence file(s) are routine again" if reclassified else "") + ".")


@app.command()
def holds(ctx: typer.Context) -> None:
    """Active holds."""
    _, catalog, _ = _catalog(ctx)
    rows = active_holds(catalog)
    emit(ctx, rows, table("Active holds", ["id", "file", "case", "since", "by", "reason"],
                          [[r["id"], r["file_id"], r["case_id"], fmt_ms(r["set_ms"]), r["actor"], r["reason"]]
                           for r in rows]))


# -- custody -----------------------------------------------------------------------------------------


@app.command("assign")
def assign_cmd(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="the recorder's device id (see: edge-agent devices)")],
    officer: Annotated[str, typer.Option("--officer", "-o", help="the officer's police number")],
    at: Annotated[str | None, typer.Option("--at", help="checkout time if not now (ISO 8601)")] = None,
    reason: OptionalReason = None,
) -> None:
    """Check a recorder out to an officer: files it recorded from then on carry the officer (files already
    collected without one get it by a signed annotation)."""
    cfg, catalog, layout = _catalog(ctx)
    try:
        checkout = assign(catalog, device, officer, at_ms=_when(at), reason=reason)
    except CustodyError as exc:
        fail(str(exc))
        raise
    sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, cfg)
    backfilled = backfill_officer(catalog, sealer, layout, checkout)
    emit(ctx, {**checkout.__dict__, "files_given_officer": backfilled},
         f"{device} checked out to officer {officer} from {fmt_ms(checkout.from_ms)}"
         + (f"; {len(backfilled)} file(s) already collected now carry the officer." if backfilled else "."))


@app.command("return")
def return_cmd(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="the recorder's device id")],
    at: Annotated[str | None, typer.Option("--at", help="return time if not now (ISO 8601)")] = None,
    reason: OptionalReason = None,
) -> None:
    """A recorder came back: end its checkout."""
    _, catalog, _ = _catalog(ctx)
    try:
        checkout = return_device(catalog, device, at_ms=_when(at), reason=reason)
    except CustodyError as exc:
        fail(str(exc))
        raise
    emit(ctx, checkout.__dict__, f"{device} returned by officer {checkout.officer_id} at {fmt_ms(checkout.to_ms)}.")


@app.command("tag")
def tag_cmd(
    ctx: typer.Context,
    file_ids: Annotated[list[str], typer.Argument(help="one or more file ids")],
    case: Case = None,
    party: Annotated[str | None, typer.Option("--party", help="the party concerned (当事人)")] = None,
    retention: Annotated[str | None, typer.Option("--retention", help=f"one of {', '.join(RETENTION_CLASSES)} "
                                                  "(default: evidence when a case is given)")] = None,
    reason: OptionalReason = None,
) -> None:
    """Link files to a case and party with a signed annotation (the manifest is never rewritten)."""
    cfg, catalog, layout = _catalog(ctx)
    sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, cfg)
    done: list[dict[str, Any]] = []
    for file_id in file_ids:
        try:
            done.append(tag(catalog, sealer, layout, file_id, case_id=case, party=party, retention=retention,
                            reason=reason))
        except (CustodyError, UnknownFile) as exc:
            fail(str(exc))
            raise
    emit(ctx, done, table(f"Tagged {len(done)} file(s)", ["file", "case", "party", "retention", "annotation"],
                          [[d["file_id"], d["case_id"], d["party"], d["retention"], d["annotation_id"]]
                           for d in done]))


# -- access: export and view (R7) ---------------------------------------------------------------------


@app.command()
def export(
    ctx: typer.Context,
    case: Annotated[str, typer.Option("--case", help="the case to export")],
    to: Annotated[Path, typer.Option("--to", help="a new or empty directory for the BagIt bag")],
    reason: Reason,
    approved_by: Annotated[str, typer.Option("--approved-by", help="who approved this copy (R7)")],
    requested_by: Annotated[str | None, typer.Option("--requested-by", help="default: your OS user")] = None,
) -> None:
    """Export a case as a BagIt bag: media, signed manifests and annotations, verification report, public key."""
    cfg, catalog, layout = _catalog(ctx)
    key = AgentKey.load_or_create(layout.keys)
    try:
        result = export_case(catalog, layout, key, cfg, case_id=case, dest=to, reason=reason,
                             approved_by=approved_by, requested_by=requested_by)
    except ExportError as exc:
        fail(str(exc))
        raise
    data = {"bag": str(result.bag_dir), "case_id": case, "files": result.files, "media_bytes": result.media_bytes,
            "not_local": result.not_local, "ok": result.ok, "problems": result.problems}
    human = (f"[green]Exported[/green] case {case}: {result.files} files, {fmt_bytes(result.media_bytes)} to "
             f"{result.bag_dir}" + (f"; {len(result.not_local)} purged locally (manifests only)"
                                    if result.not_local else ""))
    if not result.ok:
        human += f"\n[red]{len(result.problems)} verification problem(s)[/red]: " + "; ".join(result.problems[:3])
    emit(ctx, data, human)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def view(
    ctx: typer.Context,
    file_id: Annotated[str, typer.Argument(help="the file to play back")],
    reason: Reason,
    approved_by: Annotated[str, typer.Option("--approved-by", help="who approved this viewing (R7)")],
    to: Annotated[Path | None, typer.Option("--to", help="copy the file here for playback")] = None,
) -> None:
    """Play back a stored file: logs who, why and on whose approval, then gives its path (or a copy)."""
    _, catalog, layout = _catalog(ctx)
    if not reason.strip() or not approved_by.strip():
        fail("viewing needs --reason and --approved-by (R7)")
    try:
        record = catalog.get(file_id)
    except UnknownFile as exc:
        fail(str(exc))
        raise
    if record.state == "purged" or not record.store_path:
        fail(f"{file_id} is not held locally (state {record.state}); view it on the platform")
    stored = layout.data_dir / str(record.store_path)
    target = stored
    if to is not None:
        to.mkdir(parents=True, exist_ok=True)
        target = to / stored.name
        shutil.copyfile(stored, target)
    catalog.audit("file.viewed", subject=file_id, reason=reason,
                  detail={"approved_by": approved_by, "requested_by": audit.os_user(), "copy": str(to) if to else None})
    emit(ctx, {"file_id": file_id, "path": str(target)}, str(target))


# -- alarms ------------------------------------------------------------------------------------------


@alarms_app.command("list")
def alarms_list(ctx: typer.Context) -> None:
    """Active alarms, oldest first."""
    _, catalog, _ = _catalog(ctx)
    rows = [dict(r) for r in catalog.active_alarms()]
    emit(ctx, rows, table("Active alarms", ["key", "kind", "subject", "since", "message"],
                          [[r["key"], r["kind"], r["subject"], fmt_ms(r["raised_ms"]), r["message"]] for r in rows]))


@alarms_app.command("clear")
def alarms_clear(ctx: typer.Context, key: Annotated[str, typer.Argument(help="the alarm's key (alarms list)")],
                 reason: Reason) -> None:
    """Clear an alarm you have dealt with (tamper investigated, recorder identified); the reason is audited."""
    _, catalog, _ = _catalog(ctx)
    if not reason.strip():
        fail("say what was done about it: --reason")
    if not clear_by_custodian(catalog, key, reason):
        fail(f"no active alarm with key {key!r} (see: edge-agent alarms list)")
    emit(ctx, {"cleared": key}, f"Cleared {key}.")


# -- the daemon's live view, for `edge-agent status` --------------------------------------------------


def daemon_view(cfg: AgentConfig) -> dict[str, Any] | None:
    """The running daemon's last health snapshot, if fresh (three health intervals, at least 90 s)."""
    return read_health_file(cfg.agent.data_dir, max(3 * cfg.health.interval_s, 90))


def render_daemon(snapshot: dict[str, Any] | None) -> Any:
    if snapshot is None:
        return Text("The daemon is not running (no fresh health snapshot in the data dir; or you may not read "
                    "it: use sudo): start it with systemctl start edge-agent", style="yellow")
    agent = snapshot["agent"]
    disk, sync = agent["disk"], agent["sync"]
    days = disk.get("days_until_full")
    lines = [
        f"Daemon {agent['version']} up {agent['uptime_s'] // 3600} h {agent['uptime_s'] % 3600 // 60} min; "
        f"platform {'[green]connected[/green]' if sync['connected'] else '[red]not connected[/red]'}"
        + (f", last ack {fmt_ms(sync['last_ack_ms'])}" if sync.get("last_ack_ms") else ""),
        f"Disk {disk['used_percent']:.1f}% used, store {fmt_bytes(disk['store_bytes'])}"
        + (f", full in {days:.0f} days at this week's intake" if days is not None else ""),
        f"Clock: {agent['clock']['source']}"
        + (f", offset {agent['clock']['offset_ms']} ms" if agent["clock"].get("offset_ms") is not None else ""),
    ]
    parts: list[Any] = [Text.from_markup("\n".join(lines))]
    if snapshot["docks"]:
        parts.append(table("Dock slots", ["dock", "slot", "device", "officer", "state", "pending", "copied", "rate",
                                          "error"],
                           [[s["dock"], s["slot"], s["device_id"], s["officer_id"], s["state"], s["files_pending"],
                             fmt_bytes(s["bytes_copied"]), fmt_bytes(s["rate_bps"]) + "/s", s["last_error"]]
                            for s in snapshot["docks"]]))
    if snapshot["cameras"]:
        parts.append(table("Cameras", ["camera", "connected", "fps", "kbit/s", "last packet", "gaps today"],
                           [[c.get("name"), c.get("connected"), c.get("fps"), c.get("bitrate_kbps"),
                             fmt_ms(c.get("last_packet_ms")), c.get("gaps_today")] for c in snapshot["cameras"]]))
    return Group(*parts)
