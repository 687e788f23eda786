"""`edge-agent fleet serve|status|show`: the platform's fleet monitor and what a duty officer reads from it."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from edge_agent import services
from edge_agent.cli.app import app, emit, fail, fmt_bytes, fmt_ms
from edge_agent.config import ConfigError, FleetConfig, load_fleet_config
from edge_agent.i18n import _

fleet_app = typer.Typer(no_args_is_help=True, help="The platform's fleet monitor: every agent's health over MQTT.")
app.add_typer(fleet_app, name="fleet")
FLEET_CONFIG_ENV = "EDGE_FLEET_CONFIG"
DEFAULT_FLEET_CONFIG = Path("/etc/edge-fleet/fleet.toml")
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="fleet.toml ([mqtt] and [fleet]; default "
                                                   "$EDGE_FLEET_CONFIG or /etc/edge-fleet/fleet.toml)")]
WIDTH = 80


def _config(config: Path | None) -> FleetConfig:
    path = config or Path(os.environ.get(FLEET_CONFIG_ENV) or DEFAULT_FLEET_CONFIG)
    try:
        return load_fleet_config(path)
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise


@fleet_app.command("serve")
def fleet_serve(
    config: ConfigOption = None,
    listen: Annotated[str | None, typer.Option("--listen", help="host:port of /metrics (default fleet.listen)")]
    = None,
) -> None:
    """Watch every agent's status, health and events; serve them to Prometheus until SIGTERM."""
    services.fleet.serve(_config(config), listen)


def _cells(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _fit(text: str, width: int) -> str:
    """`text` in exactly `width` terminal cells: control characters shown as '?', cut with '…'."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    if _cells(text) > width:
        while _cells(text) > width - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (width - _cells(text))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h" if seconds < 86400 * 10 else f"{seconds / 86400:.0f}d"


def _known(value: Any, unit: str = "", unknown: str | None = None) -> str:
    if value is None:
        return _("unknown") if unknown is None else unknown
    return f"{value}{unit}"


def _state(a: dict[str, Any]) -> str:
    if a["online"] is False:
        return _("OFFLINE")
    if a["stale"]:
        return _("STALE")
    return _("online") if a["online"] else "?"


def status_lines(result: dict[str, Any]) -> list[str]:
    """The 80-column view: a summary line, a header, a line per agent (worst first)."""
    c = result["counts"]
    summary = _("{agents} agents: {offline} offline, {stale} stale, {over} over 24h, {regressed} regressed, "
                "{problems} with problems").format(agents=result["agents"], offline=c["offline"], stale=c["stale"],
                                                   over=c["r1_breach"], regressed=c["regressed"],
                                                   problems=c["with_problems"])
    disk_head = _("DISK")
    header = " ".join([_fit(_("AGENT"), 18), _fit(_("STATE"), 7), _fit(_("BACKLOG"), 12),
                       " " * max(0, 4 - _cells(disk_head)) + disk_head, _fit(_("CAMS"), 5), _("PROBLEM")])
    lines = [_fit(summary, WIDTH).rstrip(), header]
    for a in result["fleet"]:
        f = a["figures"]
        backlog = f"{f['queue_files']} {_age(f['oldest_unsynced_age_s'])}" if f else "-"
        disk = f"{f['disk_used_percent']:.0f}%" if f else "-"
        cams = f"{f['cameras_connected']}/{f['cameras']}" if f and f["cameras"] else "-"
        problem = a["problems"][0] if a["problems"] else _("ok")
        if len(a["problems"]) > 1:
            problem = f"(+{len(a['problems']) - 1}) {problem}"
        line = (f"{_fit(a['agent_id'], 18)} {_fit(_state(a), 7)} {_fit(backlog, 12)} {disk:>4} {_fit(cams, 5)} "
                f"{_fit(problem, WIDTH - 52)}")
        lines.append(line.rstrip())
    return lines


@fleet_app.command("status")
def fleet_status(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Every agent the monitor knows, worst first (offline, regressed, behind, stale, disk, cameras)."""
    result = services.fleet.status(_config(config)).as_dict()
    emit(ctx, result, Text("\n".join(status_lines(result))))


@fleet_app.command("show")
def fleet_show(
    ctx: typer.Context,
    agent: Annotated[str, typer.Argument(help="the agent id")],
    config: ConfigOption = None,
    events: Annotated[int, typer.Option("--events", help="how many recent events to show")] = 20,
) -> None:
    """One agent: its problems, figures, head regressions, refused messages and recent events."""
    detail = services.fleet.show(_config(config), agent, events)
    f = detail["figures"]
    out = [_("agent {agent}  site {site}  unit {unit}").format(agent=detail["agent_id"], site=detail["site"],
                                                                unit=detail["unit"]),
           _("state {state}  last health {age} ago").format(state=_state(detail), age=_age(detail["health_age_s"])),
           _("problems: ") + ("; ".join(detail["problems"]) or _("none"))]
    if f:
        out += [_("version {version}  uptime {uptime}").format(version=f["version"], uptime=_age(f["uptime_s"])),
                _("backlog {files} files, {size}, oldest {age}; uplink {uplink}, last ack {ack}").format(
                    files=f["queue_files"], size=fmt_bytes(f["queue_bytes"]), age=_age(f["oldest_unsynced_age_s"]),
                    uplink=_("up") if f["sync_connected"] else _("down"),
                    ack=fmt_ms(f["last_ack_ms"]) or _("never")),
                _("disk {percent}% used, full in {days}").format(
                    percent=f["disk_used_percent"],
                    days=_known(f["disk_days_until_full"], _(" days"), _("no intake to project"))),
                _("cameras {connected}/{cameras} connected, {recording} recording, {gaps} gaps today; "
                  "docks {occupied}/{docks} occupied").format(
                    connected=f["cameras_connected"], cameras=f["cameras"], recording=f["cameras_recording"],
                    gaps=f["camera_gaps_today"], occupied=f["docks_occupied"], docks=f["docks"]),
                _("clock offset {offset}, synchronised {synchronised}").format(
                    offset=_known(f["clock_offset_ms"], " ms"), synchronised=_known(f["clock_synchronized"])),
                _("chain head {chain}  audit head {audit}").format(chain=f["chain_head"], audit=f["audit_head"])]
        out += [_("alarm {message}").format(message=m) for m in f["alarm_messages"]]
    for head, r in detail["regressions"].items():
        out.append(_("{head} head regressions: {count}, last {time}: {why}").format(
            head=head, count=r["count"], time=fmt_ms(r["last_ms"]), why=r["why"]))
    if detail["refused"]:
        r = detail["refused"]
        out.append(_("refused messages: {count}, last {time} ({reason}): {detail}").format(
            count=r["count"], time=fmt_ms(r["last_ms"]), reason=r["last_reason"], detail=r["last_detail"]))
    out.append(_("recent events:"))
    out += [f"  {fmt_ms(e['received_ms'])} {e.get('type')} {e.get('kind') or ''} {e.get('message') or ''}".rstrip()
            for e in detail["events"]]
    emit(ctx, detail, Text("\n".join(out)))
