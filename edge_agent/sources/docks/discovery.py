"""Finding a docked volume's files: who the recorder is, which files are finished, and their catalog rows.

`identify` names the recorder from the volume (DESIGN.md section 9). `Discovery` walks the volume once per
pass: entries that cannot be taken come back as refused, files still being written (not settled) are left
for a later pass, and every other file gets its `files` row (tagged with device, officer, session and the
time its name tells) the first time it is seen. It copies nothing; the worker takes what it returns.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.sources.recorders import (
    RecorderModel,
    RefusedEntry,
    SourceFile,
    VolumeIdentity,
    identify_volume,
    parse_name,
    walk_volume,
)

# How many file names identification reads when neither USB nor an identity file names the recorder.
SAMPLE_NAMES = 20
# New rows are recorded this many to a transaction (one commit, not one per file, for a card of photos).
DISCOVER_BATCH = 64


class Chunked(ExitStack):
    """Transactions of at most `size` steps: `step()` before each write joins the open one, or opens one;
    the `size`-th step's transaction commits at the next step or at the end of the `with`."""

    def __init__(self, catalog: Catalog, size: int):
        super().__init__()
        self.catalog, self.size, self.steps = catalog, size, 0

    def step(self) -> None:
        if self.steps % self.size == 0:
            self.close()
            self.enter_context(self.catalog.transaction())
        self.steps += 1


def identify(volume: DockedVolume, models: list[RecorderModel],
             zone: ZoneInfo) -> tuple[VolumeIdentity, RecorderModel | None]:
    """The recorder behind `volume` and its model (None if unknown). Raises OSError if the volume is unreadable."""
    sample: list[str] = []
    for entry in walk_volume(volume.path):
        if isinstance(entry, SourceFile):
            sample.append(Path(entry.relative).name)
            if len(sample) >= SAMPLE_NAMES:
                break
    return identify_volume(volume.path, volume.label, models, serial=volume.serial, model_name=volume.model,
                           sample_names=sample, tz=zone)


@dataclass
class Found:
    """One pass over a volume."""

    pending: list[tuple[FileRecord, Path]] = field(default_factory=list)  # rows still to take, with their source
    refused: list[str] = field(default_factory=list)                      # "path: reason", in walk order
    young: bool = False                                                   # some file is not settled yet


class Discovery:
    """The walk of one docked volume, pass after pass, for one dock session."""

    def __init__(self, catalog: Catalog, volume: DockedVolume, ident: VolumeIdentity, model: RecorderModel | None,
                 session_id: str, zone: ZoneInfo, settle_s: float):
        self.catalog = catalog
        self.volume = volume
        self.ident = ident
        self.model = model
        self.session_id = session_id
        self.zone = zone
        self.settle_s = settle_s
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}

    def scan(self) -> Found:
        """Walk the volume once: refused entries, unsettled files, and the rows of the files to take."""
        model = self.model
        globs = model.media_globs if model else ("**/*",)
        skip = (model.identity_file,) if model and model.identity_file else ()
        found, now_ns = Found(), time.time_ns()
        with Chunked(self.catalog, DISCOVER_BATCH) as batch:
            for entry in walk_volume(self.volume.path, globs, skip):
                if isinstance(entry, RefusedEntry):
                    found.refused.append(f"{entry.relative}: {entry.reason}")
                elif self.settle_s and not self._settled(entry, now_ns):
                    found.young = True
                else:
                    record = self.catalog.find_source(self.ident.device_id, entry.relative, entry.size,
                                                      entry.mtime_ns)
                    if record is None:
                        batch.step()
                        record = self._new_record(entry)
                    if record.state in (State.DISCOVERED, State.STAGED):
                        found.pending.append((record, entry.path))
        return found

    def _settled(self, entry: SourceFile, now_ns: int) -> bool:
        """Is the file finished? Old enough by its mtime, or unchanged for settle_s by our own clock.

        The second rule matters when a recorder's clock runs ahead: its mtimes lie in the future."""
        if self.settle_s * 1e9 <= now_ns - entry.mtime_ns:
            return True
        signature, seen = (entry.size, entry.mtime_ns), self._seen.get(entry.relative)
        if seen is None or seen[0] != signature:
            self._seen[entry.relative] = (signature, time.monotonic())
            return False
        return time.monotonic() - seen[1] >= self.settle_s

    def _new_record(self, entry: SourceFile) -> FileRecord:
        catalog, ident = self.catalog, self.ident
        name = parse_name(Path(entry.relative).name, self.model, self.zone)
        start_ms = name.start_ms
        end_ms = None
        if start_ms is None:  # no time in the name: the file's mtime is when the recorder closed it
            start_ms = end_ms = entry.mtime_ns // 1_000_000
        officer = name.officer or ident.officer_id or catalog.officer_at(ident.device_id, start_ms)
        record, created = catalog.discover(
            kind="recorder", device_id=ident.device_id, original_path=entry.relative, source_path=str(entry.path),
            source_size=entry.size, source_mtime_ns=entry.mtime_ns, dock=self.volume.dock, slot=self.volume.slot,
            session_id=self.session_id, volume_label=self.volume.label, officer_id=officer,
            recorded_start_ms=start_ms, recorded_end_ms=end_ms, actor="edge-agent")
        if created and entry.size == 0:
            catalog.emit_event({"type": "fault", "kind": "zero_byte_file", "device_id": ident.device_id,
                                "file_id": record.file_id, "path": entry.relative, "ts": now_ms(),
                                "message": f"{entry.relative} on {ident.device_id} is empty (0 bytes): ingested "
                                           "as found; check the recorder for a recording fault"})
        return record
