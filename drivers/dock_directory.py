"""The `directory` dock: each folder that appears under `root` is one docked
recorder volume (tests, demos, vendor drop folders). watchdog reports folders
appearing and leaving; a folder present at start is docked at start."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from drivers.base import DockedVolume, DockListener, free_slot

log = logging.getLogger(__name__)


class DirectoryDock(FileSystemEventHandler):
    """A `DockDriver` for the folders under `root`. `slots` is the dock's size as configured; a volume beyond
    it still docks (it gets the next free slot number), as a recorder is never refused for want of a slot."""

    def __init__(self, name: str, root: Path, slots: int = 20):
        self.name = name
        self.root = Path(root)
        self.slots = slots
        self._listener: DockListener | None = None
        self._observer: Observer | None = None
        self._present: dict[str, DockedVolume] = {}
        self._lock = threading.Lock()

    def start(self, listener: DockListener) -> None:
        self._listener = listener
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(self, str(self.root), recursive=False)
        self._observer.start()
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.is_symlink():
                self._dock(child.name)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def _dock(self, label: str) -> None:
        with self._lock:
            if label in self._present or label.startswith("."):
                return  # hidden folders are volumes still being prepared (a rename docks them)
            path = self.root / label
            if not path.is_dir() or path.is_symlink():
                return
            volume = DockedVolume(dock=self.name, path=path, label=label, slot=free_slot(self._present.values()))
            self._present[label] = volume
        log.info("docked dock=%s label=%s slot=%s", self.name, label, volume.slot)
        assert self._listener is not None
        self._listener.docked(volume)

    def _undock(self, label: str) -> None:
        with self._lock:
            volume = self._present.pop(label, None)
        if volume is not None and self._listener is not None:
            log.info("undocked dock=%s label=%s", self.name, label)
            self._listener.undocked(volume)

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = Path(str(event.src_path))
        if isinstance(event, DirCreatedEvent) and src.parent == self.root:
            self._dock(src.name)
        elif isinstance(event, DirDeletedEvent) and src.parent == self.root:
            self._undock(src.name)
        elif isinstance(event, DirMovedEvent):
            dest = Path(str(event.dest_path))
            if src.parent == self.root:
                self._undock(src.name)
            if dest.parent == self.root:
                self._dock(dest.name)
