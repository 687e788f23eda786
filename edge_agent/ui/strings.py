"""Every word the status page shows, in English (the msgids), marked for extraction; `page_strings` gives
them in the page's language for the script (static/board.js looks each up by its English text)."""

from __future__ import annotations

from edge_agent.i18n import N_, translations
from edge_agent.services.alarms import ADVICE, DEFAULT_ADVICE, STUCK

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

ALL_STRINGS = (*PAGE_STRINGS, *STUCK.values(), *ADVICE.values(), DEFAULT_ADVICE)


def page_strings(language: str) -> dict[str, str]:
    """English text -> the text in `language`, for every string of the page."""
    catalog = translations(language)
    return {text: catalog.gettext(text) for text in ALL_STRINGS}
