"""What the gateway answers a GB/T 28181 platform's queries with (GB/T 28181-2016 §A.2.6): Catalog (its
cameras by their `gb_id`), DeviceInfo (the gateway) and RecordInfo (a camera's recordings in a time range,
from the catalog's segments, with the gap ledger's gaps and their causes).

RecordInfo Items are the continuous spans the agent holds: consecutive segments (each starting where the
previous ended, within `CONTIGUOUS_MS`) merge into one Item, so a day of one-minute segments without an
interruption is one Item, and every Item boundary is a gap. The gaps themselves, with their causes
(stream_lost, auth_failed, disk_full, agent_stopped, clock_step), follow in a `GapList` extension element
that platforms unaware of it skip. Times are the agent's local time without zone (`YYYY-MM-DDTHH:MM:SS`),
as the standard writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from edge_agent import __version__
from edge_agent.catalog import Catalog
from edge_agent.catalog.gaps import Gaps
from edge_agent.config import AgentConfig, Camera

CONTIGUOUS_MS = 1000
MANUFACTURER = "edge-agent"


def gb_time(ms: int, config: AgentConfig) -> str:
    return datetime.fromtimestamp(ms / 1000, config.agent.zone).strftime("%Y-%m-%dT%H:%M:%S")


def parse_gb_time(text: str, config: AgentConfig) -> int:
    """A query's StartTime/EndTime as epoch ms (a time without zone is the agent's local time); ValueError."""
    parsed = datetime.fromisoformat(text.strip().replace(" ", "T"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=config.agent.zone)
    return int(parsed.timestamp() * 1000)


@dataclass(frozen=True)
class Span:
    """A continuous run of held segments."""

    start_ms: int
    end_ms: int
    first_path: str
    size: int
    segments: int


class Answers:
    """The gateway's answers, read from the config and the catalog (cheap reads, any thread)."""

    def __init__(self, config: AgentConfig, catalog: Catalog,
                 cameras_online: Callable[[], dict[str, bool]] | None = None):
        self.config = config
        self.gaps = Gaps(catalog)
        self.cameras_online = cameras_online or dict   # camera name -> connected (the camera service's view)
        self.channels = {c.gb_id: c for c in config.cameras if c.gb_id is not None}

    def catalog_items(self) -> list[dict[str, str]]:
        section = self.config.gb28181
        items = []
        online_now = self.cameras_online()
        for gb_id, camera in self.channels.items():
            online = online_now.get(camera.name)
            items.append({"DeviceID": gb_id, "Name": camera.name, "Manufacturer": MANUFACTURER,
                          "Model": "camera", "Owner": self.config.agent.unit, "CivilCode": gb_id[:6],
                          "Address": camera.location, "Parental": "0", "ParentID": section.device_id or "",
                          "SafetyWay": "0", "RegisterWay": "1", "Secrecy": "0",
                          "Status": "OFF" if online is False else "ON"})
        return items

    def device_info(self) -> dict[str, str]:
        return {"DeviceName": self.config.gb28181.name, "Result": "OK", "Manufacturer": MANUFACTURER,
                "Model": "gateway", "Firmware": __version__, "Channel": str(len(self.channels))}

    def spans(self, camera: Camera, since_ms: int, until_ms: int) -> list[Span]:
        spans: list[Span] = []
        for seg in self.gaps.held_between(camera.name, since_ms, until_ms):
            last = spans[-1] if spans else None
            if last is not None and seg.start_ms - last.end_ms <= CONTIGUOUS_MS:
                spans[-1] = Span(last.start_ms, max(last.end_ms, seg.end_ms), last.first_path,
                                 last.size + (seg.size or 0), last.segments + 1)
            else:
                spans.append(Span(seg.start_ms, seg.end_ms, seg.original_path, seg.size or 0, 1))
        return spans

    def record_items(self, gb_id: str, since_ms: int, until_ms: int) -> list[dict[str, str]]:
        camera = self.channels[gb_id]
        return [{"DeviceID": gb_id, "Name": camera.name, "FilePath": span.first_path,
                 "Address": camera.location, "StartTime": gb_time(max(span.start_ms, since_ms), self.config),
                 "EndTime": gb_time(min(span.end_ms, until_ms), self.config), "Secrecy": "0", "Type": "time",
                 "FileSize": str(span.size)} for span in self.spans(camera, since_ms, until_ms)]

    def gap_items(self, gb_id: str, since_ms: int, until_ms: int) -> list[dict[str, str]]:
        camera = self.channels[gb_id]
        return [{"StartTime": gb_time(max(gap.start_ms, since_ms), self.config),
                 "EndTime": gb_time(min(gap.end_ms if gap.end_ms is not None else until_ms, until_ms),
                                    self.config),
                 "Cause": gap.cause, "Detail": gap.detail or ""}
                for gap in self.gaps.overlapping(camera.name, since_ms, until_ms)]
