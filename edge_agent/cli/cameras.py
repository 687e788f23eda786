"""Camera commands: `devices gaps` (was this camera recording at 14:03?), `devices locations` (the public
list of camera locations, R11) and `devices discover` (ONVIF WS-Discovery, only when asked)."""

from __future__ import annotations

import csv
import re
import sys
from datetime import datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo

import typer

from edge_agent import services
from edge_agent.cli.app import console, emit, fail, load, options, table, workspace
from edge_agent.cli.evidence import Reason, devices_app
from edge_agent.i18n import _

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(text: str, tz: ZoneInfo, now: datetime | None = None) -> int:
    """Epoch ms from "14:03", "14:03:20" (today), "2026-11-25 14:03", ISO 8601, or "2h"/"30m"/"7d" ago."""
    now = now or datetime.now(tz)
    text = text.strip()
    if match := _DURATION.match(text):
        return int((now - timedelta(**{_UNITS[match[2]]: int(match[1])})).timestamp() * 1000)
    for fmt in ("%H:%M", "%H:%M:%S"):
        try:
            clock = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return int(now.replace(hour=clock.hour, minute=clock.minute, second=clock.second,
                               microsecond=0).timestamp() * 1000)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(_("{text!r}: use 14:03, 2026-11-25 14:03, an ISO 8601 time, or 2h / 30m / 7d "
                                   "(that long ago)").format(text=text)) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return int(moment.timestamp() * 1000)


def _fmt(ms: int | None, tz: ZoneInfo) -> str:
    if ms is None:
        return _("now (still open)")
    return datetime.fromtimestamp(ms / 1000, tz).strftime("%Y-%m-%d %H:%M:%S")


@devices_app.command("gaps")
def devices_gaps(
    ctx: typer.Context,
    camera: Annotated[str, typer.Argument(help="camera name from the config")],
    since: Annotated[str | None, typer.Option("--since", help="from (default: midnight today); 14:03, "
                                                            "2026-11-25 14:03, ISO 8601, or 2h/7d ago")] = None,
    at: Annotated[str | None, typer.Option("--at", help="answer: was the camera recording at this time?")] = None,
    reason: Reason = None,
) -> None:
    """The camera's gaps in recording, with their causes; with --at, yes or the gap and its reason."""
    ws = workspace(ctx)
    tz = ws.config.agent.zone
    services.cameras.camera(ws, camera)
    if at is not None:
        answer = services.cameras.recording_at(ws, camera, parse_time(at, tz), reason=reason)
        at_ms, gap = answer.at_ms, answer.gap
        if answer.recording:
            human = _("yes: {camera} was recording at {time} (segment {file_id})").format(
                camera=camera, time=_fmt(at_ms, tz), file_id=answer.file_id)
        elif gap is not None:
            human = (_("no: {camera} was not recording at {time}: gap from {start} to {end}, cause {cause}").format(
                camera=camera, time=_fmt(at_ms, tz), start=_fmt(gap.start_ms, tz), end=_fmt(gap.end_ms, tz),
                cause=gap.cause) + (f" ({gap.detail})" if gap.detail else ""))
        else:
            human = _("unknown: no segment and no gap of {camera} covers {time} (before the camera was first "
                      "recorded, or a segment not yet taken in from the spool)").format(camera=camera,
                                                                                        time=_fmt(at_ms, tz))
        emit(ctx, answer.as_dict(), human)
        if not answer.recording:
            raise typer.Exit(1)
        return
    since_ms = parse_time(since, tz) if since else parse_time("00:00", tz)
    report = services.cameras.gap_report(ws, camera, since_ms, reason=reason)
    found = report.gaps
    emit(ctx, [g.as_dict() for g in found],
         table(_("Gaps of {camera} since {time} ({count})").format(camera=camera, time=_fmt(since_ms, tz),
                                                                    count=len(found)),
               [_("from"), _("to"), _("seconds"), _("cause"), _("detail")],
               [[_fmt(g.start_ms, tz), _fmt(g.end_ms, tz),
                 f"{((g.end_ms or report.until_ms) - g.start_ms) / 1000:.1f}", g.cause, g.detail] for g in found]))


@devices_app.command("locations")
def devices_locations(
    ctx: typer.Context,
    fmt: Annotated[str, typer.Option("--format", "-f", help="csv or table")] = "table",
) -> None:
    """Camera names and locations, for public announcement before use (R11)."""
    rows = [loc.as_dict() for loc in services.cameras.locations(load(ctx))]
    if fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=["name", "location", "location_kind"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return
    if fmt != "table":
        fail(_("--format {fmt!r}: use csv or table").format(fmt=fmt), code=2)
    emit(ctx, rows, table(_("Camera locations ({count})").format(count=len(rows)),
                          [_("camera"), _("location"), _("kind")],
                          [[r["name"], r["location"], r["location_kind"]] for r in rows]))


@devices_app.command("discover")
def devices_discover(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for answers")] = 3.0,
    target: Annotated[str | None, typer.Option("--target", help="host:port to probe instead of the WS-Discovery "
                                                                "multicast group (a known camera)")] = None,
) -> None:
    """Find ONVIF cameras on the local network (one WS-Discovery probe; sent only when you ask)."""
    address = None
    if target is not None:
        host, _colon, port = target.rpartition(":")
        if not host or not port.isdigit():
            fail(_("--target {target!r}: use host:port").format(target=target), code=2)
        address = (host, int(port))
    found = services.cameras.discover(timeout, address)
    if not found and not options(ctx).json:
        console.print(_("No ONVIF camera answered."))
        return
    emit(ctx, [f.as_dict() for f in found],
         table(_("ONVIF cameras ({count})").format(count=len(found)),
               [_("name"), _("address"), _("device service"), _("endpoint")],
               [[f.name, f.address, " ".join(f.xaddrs), f.endpoint] for f in found]))
