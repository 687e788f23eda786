"""Every word the status page shows, in English (the msgids), marked for extraction; `page_strings` gives
them in the page's language for the script (static/board.js looks each up by its English text)."""

from __future__ import annotations

from edge_agent.i18n import N_, translations

PAGE_STRINGS = (
    N_("Evidence collection status"),
    N_("Body-worn recorders"),
    N_("No body-worn recorder is docked."),
    N_("Cameras"),
    N_("No cameras configured."),
    N_("Uplink"),
    N_("Storage"),
    N_("Alarms"),
    N_("No active alarms"),
    N_("Live"),
    N_("Connection to the agent lost; retrying"),
    # bay states and fields
    N_("Identifying recorder"),
    N_("Collecting"),
    N_("Paused"),
    N_("Safe to take"),
    N_("Stuck"),
    N_("Device"),
    N_("Model"),
    N_("Officer"),
    N_("Files"),
    N_("Data"),
    N_("Rate"),
    N_("Time left"),
    N_("unknown"),
    N_("Do not remove: collection in progress"),
    # cameras and uplink
    N_("Connected"),
    N_("Not connected"),
    N_("Recording"),
    N_("Not recording"),
    N_("Gaps today"),
    N_("Waiting for upload"),
    N_("Oldest not yet synced"),
    N_("All synced"),
    N_("Uplink not configured"),
    N_("used"),
    N_("free"),
    N_("file(s)"),
    N_("since"),
    N_("Full in about"),
    N_("day(s)"),
    N_("hour(s)"),
    N_("No recent intake to project"),
    N_("Last picture"),
)

# Why a bay is stuck (services.board's codes).
STUCK = {
    "unidentified": N_("Recorder not identified: assign it to an officer (edge-agent assign), then dock it again."),
    "disk_full": N_("Storage is full: collection waits and nothing is lost. Free space or wait for upload."),
    "read_error": N_("A file could not be read: dock the recorder again; if it repeats, hand it to the technician."),
}

# What to do about an alarm, by its kind (ops/alarms and the parts that raise them).
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

ALL_STRINGS = (*PAGE_STRINGS, *STUCK.values(), *ADVICE.values(), DEFAULT_ADVICE)


def page_strings(language: str) -> dict[str, str]:
    """English text -> the text in `language`, for every string of the page."""
    catalog = translations(language)
    return {text: catalog.gettext(text) for text in ALL_STRINGS}
