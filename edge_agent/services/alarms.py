"""Active alarms: list them; clear one a custodian dealt with (the reason is audited)."""

from __future__ import annotations

from edge_agent.catalog.reports import Alarm
from edge_agent.i18n import ENGLISH, N_, _, language
from edge_agent.ops.alarms import clear_by_custodian
from edge_agent.services.workspace import ServiceError, Workspace

# Why a bay is stuck (services.board's codes).
STUCK = {
    "unidentified": N_("Recorder not identified: assign it to an officer (edge-agent assign), then dock it again."),
    "disk_full": N_("Storage is full: collection waits and nothing is lost. Free space or wait for upload."),
    "read_error": N_("A file could not be read: dock the recorder again; if it repeats, hand it to the technician."),
}

# What to do about an alarm, by its kind (ops/alarms and the parts that raise them): the status page's banner and,
# in the custodian's language, `alarms list`.
ADVICE = {
    "disk_high": N_("Storage is nearly full: check the uplink, then free storage space or add a disk."),
    "unsynced_overdue": N_("Files have waited too long for upload: check the network and the platform."),
    "clock_offset": N_("The clock is off: check time synchronisation (NTP)."),
    "tamper": N_("Stored evidence failed verification: do not touch the workstation; report to your supervisor."),
    "camera_offline": N_("The camera is offline: check its power and network cable."),
    "sync_rejected": N_("The platform refused a file: run edge-agent sync now --retry-rejected, then check the log."),
    "sync_blocked": N_("A file cannot be uploaded: run edge-agent sync now --retry-rejected, then check the log."),
    "component_stalled": N_("A part of the agent stopped responding: it is being restarted; call the technician "
                            "if this stays."),
    "recorder_unidentified": STUCK["unidentified"],
    "clock_unsynchronized": N_("The workstation's clock is not synchronised: check the time server (NTP) "
                               "connection; call the technician if this stays."),
    "recorder_handshake_failed": N_("The dock could not talk to a recorder through its maker's software: its files "
                                    "are still collected; call the technician to check the recorder's settings."),
    "recorder_battery_low": N_("A recorder's battery is low: leave it charging in the dock before it goes out."),
    "usb_device_refused": N_("A USB device that is not a registered recorder was plugged in and not read: unplug "
                             "it."),
    # ONVIF tamper events of a camera (sources/cameras/onvif_watch.py): what happened, then what to do.
    "camera_scene_changed": N_("The camera's view changed (moved, turned or covered): check the camera on site and "
                               "aim it back at its place."),
    "camera_too_blurry": N_("The camera's picture is blurred: check the lens for dirt, fog or a covering."),
    "camera_too_dark": N_("The camera's picture is too dark: check whether the lens is covered and the lighting."),
    "camera_too_bright": N_("The camera's picture is too bright: check for a light shone into the lens."),
    "camera_tamper": N_("The camera reports tampering: check the camera on site and report to your supervisor."),
}
DEFAULT_ADVICE = N_("Check the alarm with edge-agent alarms list.")


def advice(kind: str) -> str:
    """What to do about an alarm of `kind`, in the custodian's language."""
    return _(ADVICE.get(kind, DEFAULT_ADVICE))


def for_user(alarm: Alarm) -> str:
    """An alarm as the custodian reads it. The daemon words each alarm in English (logs, --json, the platform):
    in English that sentence; in another language what to do about its kind (its subject names the camera,
    recorder or file)."""
    return alarm.message if language() == ENGLISH else advice(alarm.kind)


def active(ws: Workspace) -> tuple[Alarm, ...]:
    """Alarms not cleared yet, oldest first."""
    return tuple(ws.reports.active_alarms())


def clear(ws: Workspace, key: str, *, reason: str) -> str:
    """Clear the active alarm `key` (tamper investigated, recorder identified). Returns the key."""
    catalog = ws.catalog
    if not reason.strip():
        raise ServiceError(N_("say what was done about it: --reason"))
    if not clear_by_custodian(catalog, key, reason):
        raise ServiceError(N_("no active alarm with key {key!r} (see: edge-agent alarms list)"), key=key)
    return key
