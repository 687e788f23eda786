"""Where bytes live under data_dir: staging/ (partial copies), store/ (sealed
media, read-only), manifests/ and sessions/ (signed documents), receipts/ (the
receiver's signed receipts of synced files); and who owns it (`DataDirLock`: one process at a time may
recover, ingest and clean up there)."""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from edge_agent.atrest import ENCRYPTED_MARK, AtRest, encrypted_name
from edge_agent.durable import make_dirs


@dataclass(frozen=True)
class StoreLayout:
    data_dir: Path
    # Encryption at rest (edge_agent/atrest.py): what new copies are written as, and the key to read encrypted ones.
    at_rest: AtRest = field(default_factory=AtRest, compare=False, repr=False)

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
    def checkpoints(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def keys(self) -> Path:
        return self.data_dir / "keys"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the data dir's owner for its whole life; records its pid and command."""
        return self.data_dir / "agent.lock"

    @property
    def control_socket(self) -> Path:
        """The running daemon's control socket (edge_agent/ops/control.py)."""
        return self.data_dir / "control.sock"

    def open(self) -> StoreLayout:
        """Make the layout if new and refuse (PermissionError) a data_dir open to all users: evidence and keys
        are never world-readable (R8). Every process that writes evidence (the daemon, `import`) opens it so."""
        make_dirs(self.data_dir, mode=0o750)
        mode = self.data_dir.stat().st_mode & 0o777
        if mode & 0o007:
            raise PermissionError(f"{self.data_dir} is open to all users (mode {mode:o}); "
                                  f"run: chmod o-rwx {self.data_dir}")
        self.create()
        return self

    def create(self) -> None:
        """Make the layout, every new directory durable in its parent (`durable.make_dirs`); a new data_dir
        is 0750 whatever the umask (evidence is never world-readable)."""
        if make_dirs(self.data_dir, mode=0o750):  # created (data_dir is the deepest of what was missing)
            os.chmod(self.data_dir, 0o750)
        for path in (self.staging, self.media, self.manifests, self.sessions, self.annotations):
            make_dirs(path)

    def staging_path(self, file_id: str, encrypted: bool = False) -> Path:
        return self.staging / f"{file_id}{ENCRYPTED_MARK if encrypted else ''}.part"

    def media_path(self, file_id: str, suffix: str, encrypted: bool = False) -> Path:
        # Two levels of fan-out by the ULID's random tail keep directories small.
        name = encrypted_name(file_id, suffix.lower()) if encrypted else f"{file_id}{suffix.lower()}"
        return self.media / file_id[-2:] / name

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

    def checkpoint_path(self, checkpoint_id: str) -> Path:
        return self.checkpoints / checkpoint_id[-2:] / f"{checkpoint_id}.json"

    def checkpoint_token_path(self, checkpoint_id: str) -> Path:
        """The RFC 3161 time-stamp token of a checkpoint (DER), beside it."""
        return self.checkpoints / checkpoint_id[-2:] / f"{checkpoint_id}.tsr"

    def disk_usage(self) -> shutil._ntuple_diskusage:
        return shutil.disk_usage(self.data_dir)


class DataDirOwned(RuntimeError):
    """Another process owns the data dir (`DataDirLock`). `pid` and `command` are what its lock file records
    (None / "" while the owner is still writing them)."""

    def __init__(self, data_dir: Path, pid: int | None, command: str):
        self.pid = pid
        self.command = command
        owner = f"pid {pid}" if pid is not None else "another process"
        what = f" (edge-agent {command})" if command else ""
        super().__init__(f"data dir {data_dir} owned by {owner}{what}: only one edge-agent process may "
                         f"own it; stop that one first, or use the commands that talk to it")


class DataDirLock:
    """The exclusive ownership of a data dir: `flock` on `agent.lock` in it, held for as long as this object
    (normally the process's life). The kernel releases it when the process ends however it ends (kill -9,
    power loss); the file, which outlives it, only says who held it last. The descriptor is close-on-exec,
    so a child (ffmpeg, a tool) never keeps the lock past its parent.

    The owner alone may run crash recovery (it removes partial copies and orphans that would otherwise be
    another process's in-flight work) and run dock workers; other processes write through SQLite
    transactions or through the owner's control socket (docs/OPERATIONS.md, "One owner of the data dir")."""

    def __init__(self, layout: StoreLayout, fd: int):
        self.layout = layout
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, layout: StoreLayout, *, command: str) -> DataDirLock:
        """Take the lock without waiting and record this pid and `command` in the file; raises
        `DataDirOwned` naming the holder when another process has it. The data dir must exist."""
        fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise owned_error(layout) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        return cls(layout, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the data dir up (idempotent). The lock file stays; its content is stale from here on."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def owned_error(layout: StoreLayout) -> DataDirOwned:
    """`DataDirOwned` with what the lock file records about its holder."""
    try:
        text = layout.lock_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    pid_text, _, command = text.strip().partition(" ")
    pid = int(pid_text) if pid_text.isdigit() else None
    return DataDirOwned(layout.data_dir, pid, command.strip()[:40])
