"""Import of a card or folder of recordings (`edge-agent import`): tagged, hashed and sealed as a dock would.

`import_folder` is the whole operation: it builds what it needs from the config (catalog, store layout,
signing key, sealer, ingestor, a `DockService`), finishes any copy a crash interrupted (`Ingestor.recover`),
records `import.started` in the audit log, runs one pass of a dock worker over the folder in the caller's
thread, and closes the catalog. The caller (the CLI) only renders the `ImportResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drivers.base import DockedVolume
from edge_agent.catalog import Catalog
from edge_agent.config import AgentConfig
from edge_agent.evidence.manifest import AgentKey
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.layout import StoreLayout
from edge_agent.sources.docks import DockService
from edge_agent.sources.recorders import VolumeIdentity, load_models

# The dock name an imported folder's session and files carry.
IMPORT_DOCK = "import"


class IntakeRefused(ValueError):
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


def import_folder(config: AgentConfig, path: Path, *, device_id: str, officer_id: str | None,
                  reason: str | None, on_progress: Callable[[int, int], None] | None = None) -> ImportResult:
    """Import every file under `path` as recorder `device_id` (officer `officer_id`, else from file names or
    the checkout register), in one dock session named after the folder. `reason` goes into the audit log.
    `on_progress(bytes_done, bytes_total)` is called as files are sealed. Raises IntakeRefused if `path` is
    not a folder, PermissionError if the data directory is open to all users."""
    if not path.is_dir():
        raise IntakeRefused(f"{path} is not a folder: give the card's mount point or a folder of recordings")
    layout = StoreLayout(config.agent.data_dir).open()
    catalog = Catalog(config.catalog_path)
    try:
        sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, config)
        ingestor = Ingestor(catalog, layout, sealer, config)
        ingestor.recover()
        catalog.audit("import.started", subject=str(path), reason=reason,
                      detail={"device_id": device_id, "officer_id": officer_id})
        docks = DockService(catalog, ingestor, sealer, config, load_models(config.agent.recorders_file))
        status = docks.import_volume(
            DockedVolume(dock=IMPORT_DOCK, path=path.resolve(), label=path.name),
            VolumeIdentity(device_id=device_id, method="custodian", officer_id=officer_id),
            on_progress=on_progress)
    finally:
        catalog.close()
    return ImportResult(session_id=status.session_id, device_id=device_id, files_total=status.files_total,
                        files_done=status.files_done, bytes_copied=status.bytes_copied, error=status.last_error)
