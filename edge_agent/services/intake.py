"""Import of a card or folder of recordings (`edge-agent import`): tagged, hashed and sealed as a dock would.

`import_folder` is the whole operation, done by the data dir's owner (`layout.DataDirLock`) and no one else:
- a daemon runs (it holds the lock): the request goes to it over its control socket (`ops/control.py`) and it
  runs the import on its own `DockService`, as a dock named `import`, beside its docks;
- no daemon runs: this process takes the lock for the import's length, builds what it needs from the config
  (catalog, store layout, signing key, sealer, ingestor, a `DockService`), finishes any copy a crash
  interrupted (`Ingestor.recover`, safe only under the lock), and runs one pass of a dock worker over the
  folder in the caller's thread.
Either way `import.started` is in the audit log under the caller's OS user. The caller (the CLI) only renders
the `ImportResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog, audit
from edge_agent.config import AgentConfig
from edge_agent.evidence.keys import KEY_IN_FORCE
from edge_agent.evidence.manifest import AgentKey, recover_rotation
from edge_agent.i18n import N_
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.layout import DataDirLock, DataDirOwned, StoreLayout
from edge_agent.ops import control
from edge_agent.ops.control import IMPORT_DOCK, ImportArgs, import_outcome
from edge_agent.services.workspace import TAKES_NO_REQUESTS, ServiceError, store_layout
from edge_agent.sources.docks import DockService
from edge_agent.sources.recorders import VolumeIdentity, load_models

__all__ = ["IMPORT_DOCK", "ImportResult", "IntakeRefused", "import_folder"]


class IntakeRefused(ServiceError, ValueError):
    """The import cannot start; the message says what to give instead. Nothing was written."""


@dataclass(frozen=True)
class ImportResult:
    session_id: str | None
    device_id: str
    files_total: int
    files_done: int          # sealed
    bytes_copied: int
    error: str | None        # the last error met, if any file was not imported

    @property
    def files_missing(self) -> int:
        return max(self.files_total - self.files_done, 0)

    @classmethod
    def from_outcome(cls, device_id: str, outcome: dict[str, Any]) -> ImportResult:
        def count(name: str) -> int:
            value = outcome.get(name)
            return value if isinstance(value, int) else 0

        session, error = outcome.get("session_id"), outcome.get("error")
        return cls(session_id=session if isinstance(session, str) else None, device_id=device_id,
                   files_total=count("files_total"), files_done=count("files_done"),
                   bytes_copied=count("bytes_copied"), error=None if error is None else str(error))


def import_folder(config: AgentConfig, path: Path, *, device_id: str, officer_id: str | None,
                  reason: str | None, on_progress: Callable[[int, int], None] | None = None) -> ImportResult:
    """Import every file under `path` as recorder `device_id` (officer `officer_id`, else from file names or
    the checkout register), in one dock session named after the folder. `reason` goes into the audit log.
    `on_progress(bytes_done, bytes_total)` is called as files are sealed. Raises IntakeRefused if `path` is
    not a folder, PermissionError if the data directory is open to all users, ServiceError (code 2) if the
    data dir's owner is not a daemon that takes requests (another `import`, or a daemon starting up)."""
    if not path.is_dir():
        raise IntakeRefused(N_("{path} is not a folder: give the card's mount point or a folder of recordings"),
                            path=path)
    layout = store_layout(config).open()
    args = ImportArgs(path.resolve(), device_id, officer_id, reason, user=audit.os_user())
    try:
        lock = DataDirLock.acquire(layout, command="import")
    except DataDirOwned as owned:
        return _through_owner(layout, owned, args, on_progress)
    with lock:
        return _as_owner(config, layout, args, on_progress)


def _through_owner(layout: StoreLayout, owned: DataDirOwned, args: ImportArgs,
                   on_progress: Callable[[int, int], None] | None) -> ImportResult:
    def progress(message: dict[str, Any]) -> None:
        done, total = message.get("bytes_done"), message.get("bytes_total")
        if on_progress is not None and isinstance(done, int) and isinstance(total, int):
            on_progress(done, total)

    try:
        outcome = control.request(layout.control_socket, "import", args.as_wire(), on_progress=progress)
    except control.ControlUnavailable as exc:
        raise ServiceError(TAKES_NO_REQUESTS, code=2, owner=owned, error=exc) from None
    except control.ControlError as exc:
        raise ServiceError(N_("the daemon (pid {pid}) refused the import: {error}"), pid=owned.pid,
                           error=exc) from None
    return ImportResult.from_outcome(args.device_id, outcome)


def _as_owner(config: AgentConfig, layout: StoreLayout, args: ImportArgs,
              on_progress: Callable[[int, int], None] | None) -> ImportResult:
    catalog = Catalog(config.catalog_path)
    try:
        recover_rotation(layout.keys, catalog.meta.get(KEY_IN_FORCE))   # under the lock, as the owner
        sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys, config.crypto.suite), layout, config)
        sealer.follow_suite()   # as the daemon does at start: a changed [crypto] suite is a key rotation first
        ingestor = Ingestor(catalog, layout, sealer, config)
        ingestor.recover()   # under the lock: no other process has a copy in flight
        catalog.audit("import.started", subject=str(args.path), reason=args.reason, detail=args.audit_detail())
        docks = DockService(catalog, ingestor, sealer, config, load_models(config.agent.recorders_file))
        status = docks.import_volume(
            args.volume(), VolumeIdentity(device_id=args.device_id, method="custodian", officer_id=args.officer_id),
            on_progress=on_progress)
    finally:
        catalog.close()
    return ImportResult.from_outcome(args.device_id, import_outcome(status))
