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

# A camera's blurred picture, whether the camera (ONVIF) or the agent's own check says so.
BLURRED = N_("The camera's picture is blurred: check the lens for dirt, fog or a covering.")

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
    "camera_too_blurry": BLURRED,
    "camera_too_dark": N_("The camera's picture is too dark: check whether the lens is covered and the lighting."),
    "camera_too_bright": N_("The camera's picture is too bright: check for a light shone into the lens."),
    "camera_tamper": N_("The camera reports tampering: check the camera on site and report to your supervisor."),
    # The agent's own picture checks (drivers/image_checks.py CHECKS), signed video and audio of a camera.
    "camera_black": N_("The camera's picture is black: check the camera's power, lens cover and lighting."),
    "camera_frozen": N_("The camera's picture does not change: check the camera on site; restart it if it hangs."),
    "camera_blurred": BLURRED,
    "camera_covered": N_("The camera's lens seems covered: check the camera on site and report to your supervisor."),
    "camera_signature_invalid": N_("The camera's signed video no longer verifies: the stream may have been altered "
                                   "on its way; report to your supervisor and call the technician."),
    "camera_audio_lost": N_("The camera's sound stopped: check its microphone and audio settings."),
    # A recorder's volume at the dock (sources/docks/policy.py).
    "uncollected_files": N_("Some files on a recorder could not be collected: do not reuse or wipe the recorder; "
                            "dock it again, and hand it to the technician if this stays."),
    "file_unreadable": N_("A file on a recorder could not be read: dock the recorder again; if it repeats, hand "
                          "it to the technician."),
    "volume_refused_entries": N_("Some entries on a recorder were left untouched (unsafe names or links): hand the "
                                 "recorder to the technician to inspect."),
    "dock_fault": N_("Collection from a recorder stopped on an internal error; nothing was deleted: undock and "
                     "dock it again, and call the technician if this stays."),
    "clear_refused": N_("A recorded file was not deleted from its recorder because it differs from the stored "
                        "copy: keep the recorder and report to your supervisor."),
    "disk_full": STUCK["disk_full"],
    # The uplink and the platform (sync/).
    "ack_unverified": N_("An answer from the platform could not be verified; nothing was changed or deleted: call "
                         "the technician to check the platform's key and the broker."),
    "chain_refused": N_("The platform refused the workstation's signed record chain: call the technician."),
    "chain_receipt_unverified": N_("A receipt from the platform could not be verified: call the technician to "
                                   "check the platform's key."),
    "sync_incompatible": N_("The platform speaks a protocol this workstation does not: uploads wait; call the "
                            "technician to update the agent or the platform."),
    "timestamp_failed": N_("The trusted time stamp could not be obtained; files are still collected and signed: "
                           "check the network to the time-stamp service."),
    "gb28181_unregistered": N_("The workstation is not registered with the GB/T 28181 platform: check the network "
                               "and the [gb28181] settings, or call the technician."),
}
DEFAULT_ADVICE = N_("Check the alarm with edge-agent alarms list.")


def for_user(alarm: Alarm) -> str:
    """An alarm as the custodian reads it. The daemon words each alarm in English (logs, --json, the platform):
    in English that sentence; in another language what to do about its kind (its subject names the camera,
    recorder or file), or the English sentence for a kind without advice."""
    if language() == ENGLISH or alarm.kind not in ADVICE:   # an unknown kind: its own words beat none
        return alarm.message
    return _(ADVICE[alarm.kind])


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
