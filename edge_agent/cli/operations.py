"""Operations commands: holds, custody (assign/return/tag), export, view, alarms, and the daemon's live view."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.markup import escape
from rich.text import Text

from edge_agent import services
from edge_agent.cli.app import app, emit, fail, fmt_bytes, fmt_ms, state_word, table, workspace
from edge_agent.i18n import _

alarms_app = typer.Typer(no_args_is_help=True, help="Active alarms: list them, clear one you dealt with.")
app.add_typer(alarms_app, name="alarms")

Reason = Annotated[str, typer.Option("--reason", "-r", help="why (written to the audit log)")]
OptionalReason = Annotated[str | None, typer.Option("--reason", "-r", help="why (written to the audit log)")]
Case = Annotated[str | None, typer.Option("--case", help="a case number: every file tagged with it")]


def _when(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        fail(_("--at {text!r} is not a time; write it like 2026-11-22T08:00 (local time) or with +08:00").format(
            text=text))
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
    placed = services.holds.place(workspace(ctx), reason=reason, file_id=file_id, case_id=case)
    subject = file_id or _("case {case}").format(case=case)
    emit(ctx, placed.as_dict(), _("Held {subject} (hold {hold_id}): it will not be purged until released.").format(
        subject=subject, hold_id=placed.hold_id))


@app.command()
def release(
    ctx: typer.Context,
    file_id: Annotated[str | None, typer.Argument(help="the file to release (or use --case)")] = None,
    case: Case = None,
    reason: Reason = "",
) -> None:
    """Release the holds on a file or a case. Releasing a case ends its files' evidence class."""
    done = services.holds.release(workspace(ctx), reason=reason, file_id=file_id, case_id=case)
    reclassified = done.reclassified_routine
    emit(ctx, done.as_dict(),
         _("Released {holds} hold(s) on {subject}").format(
             holds=done.released_holds, subject=file_id or _("case {case}").format(case=case))
         + (_("; {count} evidence file(s) are routine again").format(count=reclassified) if reclassified else "")
         + _("."))


@app.command()
def holds(ctx: typer.Context) -> None:
    """Active holds."""
    rows = services.holds.active(workspace(ctx))
    emit(ctx, [r.as_dict() for r in rows],
         table(_("Active holds"), [_("id"), _("file"), _("case"), _("since"), _("by"), _("reason")],
               [[r.id, r.file_id, r.case_id, fmt_ms(r.set_ms), r.actor, r.reason] for r in rows]))


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
    ws = workspace(ctx)
    done = services.custody.assign(ws, device, officer, at_ms=_when(at), reason=reason)
    backfilled = done.files_given_officer
    emit(ctx, done.as_dict(),
         _("{device} checked out to officer {officer} from {time}").format(
             device=device, officer=officer, time=fmt_ms(done.checkout.from_ms))
         + (_("; {count} file(s) already collected now carry the officer.").format(count=len(backfilled))
            if backfilled else _(".")))


@app.command("return")
def return_cmd(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="the recorder's device id")],
    at: Annotated[str | None, typer.Option("--at", help="return time if not now (ISO 8601)")] = None,
    reason: OptionalReason = None,
) -> None:
    """A recorder came back: end its checkout."""
    ws = workspace(ctx)
    checkout = services.custody.return_device(ws, device, at_ms=_when(at), reason=reason)
    emit(ctx, checkout.__dict__, _("{device} returned by officer {officer} at {time}.").format(
        device=device, officer=checkout.officer_id, time=fmt_ms(checkout.to_ms)))


@app.command("tag")
def tag_cmd(
    ctx: typer.Context,
    file_ids: Annotated[list[str], typer.Argument(help="one or more file ids")],
    case: Case = None,
    party: Annotated[str | None, typer.Option("--party", help="the party concerned (当事人)")] = None,
    retention: Annotated[str | None, typer.Option(
        "--retention", help="one of routine, evidence, long_term (default: evidence when a case is given)")] = None,
    reason: OptionalReason = None,
) -> None:
    """Link files to a case and party with a signed annotation (the manifest is never rewritten)."""
    done = [a.as_dict() for a in services.custody.tag(workspace(ctx), file_ids, case_id=case, party=party,
                                                       retention=retention, reason=reason)]
    emit(ctx, done, table(_("Tagged {count} file(s)").format(count=len(done)),
                          [_("file"), _("case"), _("party"), _("retention"), _("annotation")],
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
    result = services.export.export(workspace(ctx), case_id=case, dest=to, reason=reason, approved_by=approved_by,
                                    requested_by=requested_by)
    human = (_("[green]Exported[/green] case {case}: {files} files, {size} to {bag}").format(
        case=case, files=result.files, size=fmt_bytes(result.media_bytes), bag=result.bag)
             + (_("; {count} purged locally (manifests only)").format(count=len(result.not_local))
                if result.not_local else ""))
    if not result.ok:
        problems = _("[red]{count} verification problem(s)[/red]: ").format(count=len(result.problems))
        human += "\n" + problems + "; ".join(result.problems[:3])
    emit(ctx, result.as_dict(), human)
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
    viewing = services.files.view(workspace(ctx), file_id, reason=reason, approved_by=approved_by, to=to)
    emit(ctx, viewing.as_dict(), str(viewing.path))


# -- alarms ------------------------------------------------------------------------------------------


@alarms_app.command("list")
def alarms_list(ctx: typer.Context) -> None:
    """Active alarms, oldest first."""
    rows = services.alarms.active(workspace(ctx))
    emit(ctx, [r.as_dict() for r in rows],
         table(_("Active alarms"), [_("key"), _("kind"), _("subject"), _("since"), _("message")],
               [[r.key, r.kind, r.subject, fmt_ms(r.raised_ms),
                 services.alarms.for_user(r)] for r in rows],
               drop=[_("since"), _("subject"), _("kind")], wrap=[_("message")])
         if rows else Text(_("no active alarms"), style="green"))


@alarms_app.command("clear")
def alarms_clear(ctx: typer.Context, key: Annotated[str, typer.Argument(help="the alarm's key (alarms list)")],
                 reason: Reason) -> None:
    """Clear an alarm you have dealt with (tamper investigated, recorder identified); the reason is audited."""
    cleared = services.alarms.clear(workspace(ctx), key, reason=reason)
    emit(ctx, {"cleared": cleared}, _("Cleared {alarm}.").format(alarm=cleared))


# -- the daemon's live view, for `edge-agent status` --------------------------------------------------


def render_daemon(snapshot: Mapping[str, Any] | None) -> Any:
    """The daemon's last health snapshot (services.status.daemon_snapshot) as lines and tables."""
    if snapshot is None:
        return Text(_("The daemon is not running (no fresh health snapshot in the data dir; or you may not read "
                      "it: use sudo): start it with systemctl start edge-agent"), style="yellow")
    agent = snapshot["agent"]
    disk, sync = agent["disk"], agent["sync"]
    days = disk.get("days_until_full")
    connected = ("[green]" + _("connected") + "[/green]") if sync["connected"] else ("[red]" + _("not connected")
                                                                                      + "[/red]")
    lines = [
        _("Daemon {version} up {hours} h {minutes} min; platform {connected}").format(
            version=agent["version"], hours=agent["uptime_s"] // 3600, minutes=agent["uptime_s"] % 3600 // 60,
            connected=connected)
        + (_(", last ack {time}").format(time=fmt_ms(sync["last_ack_ms"])) if sync.get("last_ack_ms") else ""),
        _("Storage {percent:.1f}% used, store {size}").format(percent=disk["used_percent"],
                                                              size=fmt_bytes(disk["store_bytes"]))
        + (_(", full in {days:.0f} days at this week's intake").format(days=days) if days is not None else ""),
        _("Clock: {source}").format(source=agent["clock"]["source"])
        + (_(", offset {offset} ms").format(offset=agent["clock"]["offset_ms"])
           if agent["clock"].get("offset_ms") is not None else ""),
    ]
    parts: list[Any] = [Text.from_markup("\n".join(lines))]
    if snapshot["docks"]:
        parts.append(table(_("Dock slots"), [_("dock"), _("slot"), _("device"), _("officer"), _("state"),
                                             _("pending"), _("copied"), _("rate"), _("error")],
                           [[s["dock"], s["slot"], s["device_id"], s["officer_id"], state_word(s["state"]),
                             s["files_pending"], fmt_bytes(s["bytes_copied"]), fmt_bytes(s["rate_bps"]) + "/s",
                             s["last_error"]]
                            for s in snapshot["docks"]],
                           drop=[_("error"), _("rate"), _("officer"), _("copied"), _("slot")]))
    if snapshot["cameras"]:
        parts.append(table(_("Cameras"), [_("camera"), _("connected"), "fps", "kbit/s", _("last packet"),
                                          _("gaps today")],
                           [[c.get("name"), _("yes") if c.get("connected") else _("no"), c.get("fps"),
                             c.get("bitrate_kbps"), fmt_ms(c.get("last_packet_ms")), c.get("gaps_today")]
                            for c in snapshot["cameras"]],
                           drop=["kbit/s", "fps", _("last packet")]))
    if snapshot.get("gb28181"):   # the GB/T 28181 device ([gb28181] enabled)
        parts.append(Text.from_markup(render_gb28181(snapshot["gb28181"])))
    return Group(*parts)


def render_gb28181(gb: Mapping[str, Any]) -> str:
    """One line: registered with the GB/T 28181 platform or not, the last keepalive answered, the last error."""
    state = (("[green]" + _("registered") + "[/green]") if gb["registered"]
             else ("[red]" + _("not registered") + "[/red]"))
    line = _("GB/T 28181 platform {server}: {state}").format(server=gb["server"], state=state)
    if gb.get("last_keepalive_ok_ms"):
        line += _(", last keepalive answered {time}").format(time=fmt_ms(gb["last_keepalive_ok_ms"]))
    if gb.get("last_error") and not gb["registered"]:
        line += _(" (last error: {error})").format(error=escape(str(gb["last_error"])))
    return line
