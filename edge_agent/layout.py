"""Where bytes live under data_dir: staging/ (partial copies), store/ (sealed
media, read-only), manifests/ and sessions/ (signed documents), receipts/ (the
receiver's signed receipts of synced files)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoreLayout:
    data_dir: Path

    @property
    def staging(self) -> Path:
        return self.data_dir / "staging"

    @property
    def media(self) -> Path:
        return self.data_dir / "store"

    @property
    def manifests(self) -> Path:
        return self.data_dir / "manifests"

    @property
    def sessions(self) -> Path:
        return self.data_dir / "sessions"

    @property
    def annotations(self) -> Path:
        return self.data_dir / "annotations"

    @property
    def keys(self) -> Path:
        return self.data_dir / "keys"

    def open(self) -> StoreLayout:
        """Make the layout if new and refuse (PermissionError) a data_dir open to all users: evidence and keys
        are never world-readable (R8). Every process that writes evidence (the daemon, `import`) opens it so."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        mode = self.data_dir.stat().st_mode & 0o777
        if mode & 0o007:
            raise PermissionError(f"{self.data_dir} is open to all users (mode {mode:o}); "
                                  f"run: chmod o-rwx {self.data_dir}")
        self.create()
        return self

    def create(self) -> None:
        """Make the layout; a new data_dir is 0750 whatever the umask (evidence is never world-readable)."""
        if not self.data_dir.exists():
            self.data_dir.mkdir(parents=True, mode=0o750)
            os.chmod(self.data_dir, 0o750)
        for path in (self.staging, self.media, self.manifests, self.sessions, self.annotations):
            path.mkdir(parents=True, exist_ok=True)

    def staging_path(self, file_id: str) -> Path:
        return self.staging / f"{file_id}.part"

    def media_path(self, file_id: str, suffix: str) -> Path:
        # Two levels of fan-out by the ULID's random tail keep directories small.
        return self.media / file_id[-2:] / f"{file_id}{suffix.lower()}"

    def manifest_path(self, file_id: str) -> Path:
        return self.manifests / file_id[-2:] / f"{file_id}.json"

    @property
    def receipts(self) -> Path:
        return self.data_dir / "receipts"

    def receipt_path(self, file_id: str) -> Path:
        """The receiver's signed receipt of a synced file, kept beside its manifest's fan-out."""
        return self.receipts / file_id[-2:] / f"{file_id}.json"

    def session_manifest_path(self, session_id: str) -> Path:
        return self.sessions / f"{session_id}.json"

    def annotation_path(self, annotation_id: str) -> Path:
        return self.annotations / f"{annotation_id}.json"

    def disk_usage(self) -> shutil._ntuple_diskusage:
        return shutil.disk_usage(self.data_dir)
