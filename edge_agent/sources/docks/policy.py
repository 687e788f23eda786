"""What a failure on a dock slot means, and the words the custodian reads about it.

Every alarm a dock raises is built here (`Alarm`), so its key, kind and text are in one place and the
steps that meet the failure (discovery, copying, clearing) only say which one. `IngestFaults` is the
error policy of one volume's copies: per kind of `IngestError`, whether the pass goes on with the next
file or stops, what is written on the file's row, and what is raised. Nothing here deletes anything.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from drivers.base import DockedVolume, RefusedDevice
from drivers.gat947 import RecorderHandshake
from edge_agent.catalog import Catalog, FileRecord
from edge_agent.catalog.docking import DockingRecords
from edge_agent.ingest import IngestError, IntakePaused, SourceGone, SourceUnreadable
from edge_agent.sources.docks.slots import SlotState, SlotStatus
from edge_agent.sources.recorders import VolumeIdentity

log = logging.getLogger(__name__)

# Alarm kinds raised here about what a dock sees on its USB bus.
RECORDER_HANDSHAKE_FAILED = "recorder_handshake_failed"
RECORDER_BATTERY_LOW = "recorder_battery_low"
USB_DEVICE_REFUSED = "usb_device_refused"

# How long a read error waits for the dock driver to report an undock before it counts as the file's own fault.
UNDOCK_GRACE_S = 2.0


@dataclass(frozen=True)
class Alarm:
    """One alarm as raised in the catalog: active once per `key` until cleared."""

    key: str
    kind: str
    subject: str
    message: str

    def raise_on(self, catalog: Catalog) -> bool:
        return catalog.raise_alarm(self.key, self.kind, self.subject, self.message)


def unidentified(volume: DockedVolume, ident: VolumeIdentity) -> Alarm:
    return Alarm(f"unidentified:{volume.dock}:{volume.label}", "recorder_unidentified", ident.device_id,
                 f"recorder volume {volume.label!r} on dock {volume.dock} could not be identified (no USB serial, "
                 f"identity file or known file names); its files are ingested as {ident.device_id}: add its model "
                 "to recorders.toml or assign it")


def handshake_key(dock: str, usb_serial: str | None) -> str:
    return f"handshake:{dock}:{usb_serial}"


def handshake_failed(dock: str, usb_serial: str | None, report: RecorderHandshake) -> Alarm:
    """The recorder's vendor handshake (GA/T 947.4) failed in part or whole; the dock identifies it by USB."""
    subject = report.serial or usb_serial or "unknown"
    fallback = ("it is identified by USB instead and its files are ingested all the same"
                if report.serial is None else "what it did tell is used")
    return Alarm(handshake_key(dock, usb_serial), RECORDER_HANDSHAKE_FAILED, subject,
                 f"the GA/T 947.4 handshake with recorder {usb_serial or '(no USB serial)'} on dock {dock} failed: "
                 f"{'; '.join(report.errors)}; {fallback}. Check the model's [models.gat947] entry in recorders.toml "
                 "(library path, function names, password)")


def battery_key(device_id: str) -> str:
    return f"battery:{device_id}"


def battery_low(device_id: str, report: RecorderHandshake) -> Alarm:
    return Alarm(battery_key(device_id), RECORDER_BATTERY_LOW, device_id,
                 f"recorder {device_id} docked with {report.battery_percent}% battery (alarm below "
                 f"{report.low_battery_percent}%, R10): leave it charging before it goes out again; if it stays "
                 "low after a full charge, have its battery checked")


def refused_device(dock: str, device: RefusedDevice) -> Alarm:
    """A USB mass-storage device that is not a known recorder was not read (`unknown_devices = "refuse"`)."""
    if device.vendor_id is None:
        what = f"a volume {device.label!r} that no known recorder on the bus claims"
    else:
        what = (f"USB mass-storage device vendor {device.vendor_id:04x} product {device.product_id or 0:04x} "
                f"serial {device.serial or '(none)'}")
        names = " ".join(n for n in (device.manufacturer, device.product) if n)
        what += f" ({names})" if names else ""
    return Alarm(f"usb_refused:{dock}:{device.vendor_id}:{device.product_id}:{device.serial}:{device.label}",
                 USB_DEVICE_REFUSED, device.serial or device.label or "unknown",
                 f"dock {dock} refused {what}: it is not a recorder in recorders.toml and the dock's unknown_devices "
                 "is refuse (R8: recorders never meet unrelated devices); nothing on it was read. Unplug it; if it "
                 "is a recorder, add its model to recorders.toml")


def dock_fault(volume: DockedVolume, exc: BaseException) -> Alarm:
    return Alarm(f"dock_fault:{volume.dock}:{volume.label}", "dock_fault", volume.label,
                 f"ingest of volume {volume.label!r} on dock {volume.dock} stopped on an internal error "
                 f"({type(exc).__name__}: {exc}); nothing was deleted from the recorder. Undock and re-dock it to "
                 "retry, and report the error from the agent's log")


def refused_entries(volume: DockedVolume, refused: list[str]) -> Alarm:
    return Alarm(f"refused:{volume.dock}:{volume.label}", "volume_refused_entries", volume.label,
                 f"{len(refused)} entr(ies) on volume {volume.label!r} were not taken (symlink, unsafe name or "
                 f"unreadable), first: {refused[0]}; they are left untouched on the recorder for inspection")


def uncollected_key(volume: DockedVolume) -> str:
    return f"uncollected:{volume.dock}:{volume.label}"


def uncollected_files(volume: DockedVolume, device_id: str, left: list[tuple[str, str]]) -> Alarm:
    """Files found on the volume that could not be collected: the slot is not done and nothing is cleared."""
    shown = "; ".join(f"{path} ({error})" for path, error in left[:3])
    more = f" and {len(left) - 3} more" if len(left) > 3 else ""
    return Alarm(uncollected_key(volume), "uncollected_files", device_id,
                 f"{len(left)} file(s) on recorder {device_id} (volume {volume.label!r}, dock {volume.dock}) could "
                 f"not be collected: {shown}{more}. Do NOT reuse or wipe the recorder: nothing on it is cleared "
                 "and it is not done until they are; they are retried at every rescan. Check its card, or have "
                 "them read out by a technician")


def unreadable(record: FileRecord, message: str) -> Alarm:
    return Alarm(f"unreadable:{record.file_id}", "file_unreadable", record.device_id, message)


def clear_refused(record: FileRecord, why: str) -> Alarm:
    """The recorder's original was not deleted: `why` says how it differs from the confirmed copy."""
    return Alarm(f"clear_mismatch:{record.file_id}", "clear_refused", record.device_id,
                 f"{record.original_path} on {record.device_id} {why}; it was NOT deleted")


def disk_full(agent_id: str, exc: IntakePaused) -> Alarm:
    return Alarm("disk_full", "disk_full", agent_id, str(exc))


def _storage_fault(record: FileRecord, exc: SourceGone) -> str:
    cause = exc.__cause__.strerror if isinstance(exc.__cause__, OSError) else str(exc)
    return (f"{record.original_path} on {record.device_id}: read failed ({cause}) while the recorder stayed "
            "docked: a storage fault on the recorder (bad sector?); the file is kept there and retried at every "
            "rescan; check or replace the recorder's card")


class Step(Enum):
    """What the pass does after a file's copy failed."""

    NEXT = "next"   # go on with the volume's next file
    STOP = "stop"   # end this pass (paused, or the recorder is gone); the next rescan starts again


class IngestFaults:
    """The error policy for the copies of one docked volume; updates its slot status and the catalog."""

    def __init__(self, catalog: Catalog, records: DockingRecords, status: SlotStatus, volume: DockedVolume,
                 agent_id: str, gone: threading.Event):
        self.catalog = catalog
        self.records = records
        self.status = status
        self.volume = volume
        self.agent_id = agent_id
        self.gone = gone
        self.paused = False

    def failed(self, record: FileRecord, path: Path, exc: IngestError) -> Step:
        """Apply the policy to one failed copy."""
        if isinstance(exc, IntakePaused):
            return self._paused(record, exc)
        if isinstance(exc, SourceGone):
            return self._source_gone(record, path, exc)
        if isinstance(exc, SourceUnreadable):
            self._unreadable(record, str(exc))
            return Step.NEXT
        self.status.last_error = str(exc)
        self.records.record_failure(record, str(exc))
        log.error("ingest failed file=%s: %s", record.file_id, exc)
        return Step.NEXT

    def succeeded(self) -> None:
        """A copy went through: a pause (store full) is over."""
        if self.paused:
            self.catalog.clear_alarm("disk_full")
            self.paused = False

    def _paused(self, record: FileRecord, exc: IntakePaused) -> Step:
        if not self.paused:   # once per pause, not at every rescan
            log.warning("intake paused dock=%s file=%s: %s", self.volume.dock, record.file_id, exc)
        self.status.set_state(SlotState.PAUSED, error=str(exc))
        self.paused = True
        try:
            disk_full(self.agent_id, exc).raise_on(self.catalog)
        except sqlite3.OperationalError as alarm_exc:  # so full that not even the alarm fits
            log.error("disk_full alarm not recorded dock=%s: %s", self.volume.dock, alarm_exc)
        return Step.STOP

    def _source_gone(self, record: FileRecord, path: Path, exc: SourceGone) -> Step:
        self.status.last_error = str(exc)
        log.warning("source gone dock=%s file=%s: %s", self.volume.dock, record.file_id, exc)
        if self.gone.is_set():
            return Step.STOP
        if self._read_fault(record, path):
            self._unreadable(record, _storage_fault(record, exc))
            return Step.NEXT
        return Step.STOP if self.gone.is_set() else Step.NEXT

    def _read_fault(self, record: FileRecord, path: Path) -> bool:
        """After a read error: is the recorder still docked and the file unchanged? Then the error is the
        file's, not a recorder pulled out (whose driver reports the undock within a poll or two)."""
        def unchanged() -> bool:
            try:
                st = os.lstat(path)
            except OSError:
                return False
            return (st.st_size, st.st_mtime_ns) == (record.source_size, record.source_mtime_ns)

        return unchanged() and not self.gone.wait(UNDOCK_GRACE_S) and unchanged()

    def _unreadable(self, record: FileRecord, message: str) -> None:
        self.status.last_error = message
        self.records.record_failure(record, message)
        unreadable(record, message).raise_on(self.catalog)
