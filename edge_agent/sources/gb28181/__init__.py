"""GB/T 28181 device mode for a camera gateway (docs/CAMERAS.md, "GB/T 28181"): registration, keepalive and
the Catalog / DeviceInfo / RecordInfo answers. Live and playback media over RTP are not offered."""

from edge_agent.sources.gb28181.device import ALARM_KIND, GbDevice

__all__ = ["ALARM_KIND", "GbDevice"]
