"""What the fleet monitor makes of one agent's messages: pure functions, no MQTT, no database.

A message is read by `read_payload` (size cap before parsing, nesting, JSON Schema of docs/PROTOCOL.md) into a
dict or a `Refusal` with a reason from `REFUSALS` (a bounded set: it is a metric label). `AgentRecord` keeps
what the monitor knows of one agent: its last status, the figures derived from its last health snapshot
(`figures_of`), the chain and audit heads to compare the next snapshot against, and the head regressions
seen. `assess` turns a record into what a duty officer reads: online, stale, R1 breach, problems, worst first.

A head is `seq:sha256` (the newest audit entry, the newest signed document). It regresses when its sequence
goes down between two snapshots, when it changes without growing (same sequence, another hash), or when it
disappears: each is what a restored backup, a swapped database or a rewritten log looks like from outside.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol.wire import WireError, validate

R1_LIMIT_S = 24 * 3600      # R1: anything not on the platform 24 h after it reached the agent
DISK_WARN_PERCENT = 90.0
DISK_WARN_DAYS = 3.0
CLOCK_WARN_MS = 2000
HEADS = ("chain", "audit")
MAX_AGENT_ID = 128          # characters of a topic's agent segment; longer ones are refused

# Alarm kinds the agent raises (docs/OPERATIONS.md); anything else is counted as "other", so a misbehaving agent
# cannot create series at will.
ALARM_KINDS = frozenset({
    "disk_high", "disk_full", "unsynced_overdue", "camera_down", "image_check_failed", "clock_offset",
    "recorder_unidentified", "rejected", "sync_rejected", "tamper", "sync_incompatible", "component_stalled",
    "ack_unverified", "clear_refused", "scrub_failed", "dock_error",
    # a camera's own ONVIF tamper events (sources/cameras/onvif_watch.py)
    "camera_scene_changed", "camera_too_blurry", "camera_too_dark", "camera_too_bright", "camera_tamper",
})
REFUSALS = ("bad_topic", "too_large", "not_json", "too_deep", "schema", "agent_mismatch", "agent_limit")
TOPICS = ("status", "health", "events")


@dataclass(frozen=True)
class Refusal:
    reason: str      # one of REFUSALS
    detail: str      # for the log and `fleet show`


def read_payload(kind: str, payload: bytes, max_bytes: int) -> dict[str, Any] | Refusal:
    """`payload` of a `status`, `health` or `events` message as a dict that follows its schema, or why not."""
    if len(payload) > max_bytes:
        return Refusal("too_large", f"{len(payload)} bytes, more than the {max_bytes} allowed")
    try:
        value = json.loads(payload)
    except RecursionError:
        return Refusal("too_deep", "nested deeper than the JSON parser allows")
    except ValueError as exc:   # UnicodeDecodeError and JSONDecodeError both are
        return Refusal("not_json", f"not UTF-8 JSON: {exc}"[:200])
    try:
        validate({"events": "event"}.get(kind, kind), value)
    except WireError as exc:
        return Refusal("schema", str(exc))
    except RecursionError:
        return Refusal("too_deep", "nested deeper than the schema check allows")
    return value


def parse_head(value: str | None) -> tuple[int, str] | None:
    """`seq:sha256` as (seq, sha256); None for none or a value of another shape."""
    if not value:
        return None
    seq, _, digest = value.partition(":")
    return (int(seq), digest) if seq.isdigit() else None


def head_regression(before: str | None, after: str | None) -> str | None:
    """Why `after` is a regression of `before`, or None if it is not."""
    old, new = parse_head(before), parse_head(after)
    if old is None:
        return None
    if new is None:
        return f"head {before} disappeared (now {after!r})"
    if new[0] < old[0]:
        return f"sequence went down from {old[0]} to {new[0]}"
    if new[0] == old[0] and new[1] != old[1]:
        return f"head changed without growing: {before} -> {after}"
    return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def figures_of(snapshot: dict[str, Any], default_interval_s: float) -> dict[str, Any]:
    """The figures the fleet watches, from one schema-valid health snapshot."""
    agent = snapshot["agent"]
    queue, disk, sync, clock = agent["queue"], agent["disk"], agent["sync"], agent["clock"]
    alarms: dict[str, int] = {}
    for alarm in snapshot["alarms"]:
        kind = alarm["kind"] if alarm["kind"] in ALARM_KINDS else "other"
        alarms[kind] = alarms.get(kind, 0) + 1
    cameras = snapshot["cameras"]
    docks = snapshot["docks"]
    return {
        "ts_ms": snapshot["ts_ms"],
        "interval_s": _number(agent.get("health_interval_s")) or default_interval_s,
        "version": agent["version"],
        "uptime_s": agent["uptime_s"],
        "queue_files": queue["files"], "queue_bytes": queue["bytes"],
        "oldest_unsynced_age_s": queue["oldest_unsynced_age_s"],
        "sync_connected": sync["connected"], "sync_rate_bps": _number(sync.get("rate_bps")),
        "last_ack_ms": sync["last_ack_ms"],
        "disk_used_percent": disk["used_percent"], "disk_days_until_full": disk["days_until_full"],
        "disk_free_bytes": disk["free_bytes"],
        "alarms": alarms,
        "alarm_messages": [f"{a['kind']}: {a['message']}"[:200] for a in snapshot["alarms"][:20]],
        "cameras": len(cameras),
        "cameras_connected": sum(1 for c in cameras if c["connected"]),
        "cameras_recording": sum(1 for c in cameras if c.get("recording")),
        "camera_gaps_today": sum(c.get("gaps_today", 0) for c in cameras),
        "cameras_down": sorted(c["name"][:64] for c in cameras if not c["connected"])[:20],
        "docks": len(docks),
        "docks_occupied": sum(1 for d in docks if d["state"] != "undocked"),
        "clock_offset_ms": clock["offset_ms"], "clock_synchronized": clock["synchronized"],
        "chain_head": agent.get("chain_head"), "audit_head": agent.get("audit_head"),
    }


@dataclass
class AgentRecord:
    """What the monitor knows of one agent; `as_dict`/`from_dict` are the stored form (catalog/fleet.py)."""

    agent_id: str
    site: str = ""
    unit: str = ""
    status: str | None = None             # "online" / "offline" from the status topic (the will says offline)
    status_ms: int | None = None          # the status message's own ts
    status_received_ms: int | None = None
    health_received_ms: int | None = None
    figures: dict[str, Any] | None = None
    heads: dict[str, str | None] = field(default_factory=dict)
    regressions: dict[str, dict[str, Any]] = field(default_factory=dict)   # head -> count, last_ms, why
    refused: dict[str, Any] = field(default_factory=dict)                  # count, last_reason, last_detail, last_ms

    def as_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)   # written outside the monitor's lock

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def take_status(self, status: dict[str, Any], received_ms: int) -> None:
        self.status, self.status_ms, self.status_received_ms = status["state"], status["ts"], received_ms

    def take_health(self, snapshot: dict[str, Any], received_ms: int, default_interval_s: float) -> list[str]:
        """Adopt a snapshot; returns the regressions it shows (a description each, also recorded)."""
        self.site, self.unit = snapshot["site_id"], snapshot["unit"]
        self.figures = figures_of(snapshot, default_interval_s)
        self.health_received_ms = received_ms
        # New dicts, never changed in place: a scrape reads a record outside the monitor's lock.
        found = []
        heads, regressions = dict(self.heads), dict(self.regressions)
        for head in HEADS:
            after = snapshot["agent"].get(f"{head}_head")
            why = head_regression(heads.get(head), after)
            if why is not None:
                count = regressions.get(head, {}).get("count", 0) + 1
                regressions[head] = {"count": count, "last_ms": received_ms, "why": why}
                found.append(f"{head} {why}")
            heads[head] = after
        self.heads, self.regressions = heads, regressions
        return found

    def refuse(self, refusal: Refusal, received_ms: int) -> None:
        self.refused = {"count": self.refused.get("count", 0) + 1, "last_reason": refusal.reason,
                        "last_detail": refusal.detail[:300], "last_ms": received_ms}


# Problems, most urgent first: `assess` lists an agent's in this order and `status` sorts agents by the first.
SEVERITY = ("chain_regressed", "offline", "r1_breach", "stale", "no_health", "disk", "cameras_down",
            "sync_incompatible", "component_stalled", "clock", "alarms")


def _figure_problems(f: dict[str, Any]) -> list[tuple[str, str]]:
    """Disk, cameras, alarms and clock, from a snapshot's figures."""
    problems = []
    days = f.get("disk_days_until_full")
    if (f.get("disk_used_percent") or 0) >= DISK_WARN_PERCENT or (days is not None and days < DISK_WARN_DAYS):
        problems.append(("disk", f"disk {f.get('disk_used_percent')}% used, full in {days} days"))
    down = f.get("cameras", 0) - f.get("cameras_connected", 0)
    if down > 0:
        problems.append(("cameras_down", f"{down} camera(s) down: {', '.join(f.get('cameras_down', []))}"))
    alarms = f.get("alarms", {})
    for kind in ("sync_incompatible", "component_stalled"):
        if alarms.get(kind):
            problems.append((kind, f"alarm {kind}"))
    offset = f.get("clock_offset_ms")
    if offset is not None and abs(offset) > CLOCK_WARN_MS:
        problems.append(("clock", f"clock off by {offset} ms"))
    if alarms and not any(p[0] in ("sync_incompatible", "component_stalled") for p in problems):
        problems.append(("alarms", f"{sum(alarms.values())} alarm(s): {', '.join(sorted(alarms))}"))
    return problems


def assess(record: AgentRecord, now_ms: int, stale_intervals: float, regression_hold_ms: int) -> dict[str, Any]:
    """The figures a person or Prometheus reads, derived at `now_ms`."""
    f = record.figures or {}
    problems: list[tuple[str, str]] = []
    regressed = {head: bool(r.get("last_ms") and now_ms - r["last_ms"] < regression_hold_ms)
                 for head, r in record.regressions.items()}
    for head, on in regressed.items():
        if on:
            problems.append(("chain_regressed", f"{head} head regressed: {record.regressions[head]['why']}"))
    online = record.status == "online" if record.status is not None else None
    if online is False:
        problems.append(("offline", "offline (its will or a clean stop)"))
    interval_s = f.get("interval_s") or 30.0
    health_age_s = None if record.health_received_ms is None else max(0.0, (now_ms - record.health_received_ms) / 1000)
    stale = online is not False and (health_age_s is None or health_age_s > stale_intervals * interval_s)
    if health_age_s is None:
        problems.append(("no_health", "no health snapshot received"))
    elif stale:
        problems.append(("stale", f"no health for {health_age_s:.0f} s (interval {interval_s:g} s)"))
    oldest = f.get("oldest_unsynced_age_s")
    r1 = oldest is not None and oldest >= R1_LIMIT_S
    if r1:
        problems.append(("r1_breach", f"oldest unsynced file {oldest / 3600:.1f} h old (R1: 24 h)"))
    problems += _figure_problems(f)
    problems.sort(key=lambda p: SEVERITY.index(p[0]))
    return {
        "agent_id": record.agent_id, "site": record.site, "unit": record.unit,
        "online": online, "stale": stale, "health_age_s": health_age_s, "r1_breach": r1,
        "regressed": regressed, "problems": [text for _, text in problems],
        "worst": problems[0][0] if problems else None,
        "rank": SEVERITY.index(problems[0][0]) if problems else len(SEVERITY),
        "figures": f, "regressions": record.regressions, "refused": record.refused,
        "status_received_ms": record.status_received_ms, "health_received_ms": record.health_received_ms,
    }


def worst_first(assessed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(assessed, key=lambda a: (a["rank"], -len(a["problems"]), a["agent_id"]))
