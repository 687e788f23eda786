"""Crash recovery: bring the store in line with the catalog after any stop.

The catalog is the truth: a row records a state only once the bytes behind it are durable. So after a
crash, a partial copy in staging/ is removed, a copy renamed into the store whose row still says
`discovered` is an orphan (removed, recopied from the source), and a `staged` file is sealed if its copy
is there or sent back to `discovered` if not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edge_agent.catalog import Catalog, State
from edge_agent.durable import fsync_dir
from edge_agent.ingest.seal import Sealer
from edge_agent.layout import StoreLayout

log = logging.getLogger(__name__)


def unlink_quietly(path: Path) -> None:
    """Remove `path` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_partials(layout: StoreLayout) -> int:
    removed = 0
    for part in layout.staging.glob("*.part"):
        unlink_quietly(part)
        removed += 1
    if removed:
        fsync_dir(layout.staging)
    return removed


def _remove_orphans(catalog: Catalog, layout: StoreLayout) -> int:
    removed = 0
    for record in catalog.files(states=[State.DISCOVERED]):
        for encrypted in (False, True):   # written plain or encrypted (edge_agent/atrest.py), whatever the setting now
            orphan = layout.media_path(record.file_id, Path(record.original_path).suffix, encrypted=encrypted)
            if orphan.exists():  # renamed into the store, but the row was never written: redo from source
                unlink_quietly(orphan)
                fsync_dir(orphan.parent)
                removed += 1
    return removed


def _reseal_staged(catalog: Catalog, layout: StoreLayout, sealer: Sealer) -> int:
    resealed = 0
    for record in catalog.files(states=[State.STAGED]):
        stored = layout.data_dir / (record.store_path or "")
        if record.store_path and stored.is_file() and record.sha256:
            sealer.seal(record)
            resealed += 1
        else:
            catalog.transition(record.file_id, State.DISCOVERED, expect=State.STAGED,
                               actor="edge-agent", reason="staged copy missing after restart; recopy",
                               sha256=None, size=None, store_path=None)
    return resealed


def recover(catalog: Catalog, layout: StoreLayout, sealer: Sealer) -> dict[str, int]:
    """Bring the store in line with the catalog. Returns what was done (partials_removed,
    orphans_removed, resealed)."""
    layout.create()
    done = {"partials_removed": _remove_partials(layout),
            "orphans_removed": _remove_orphans(catalog, layout),
            "resealed": _reseal_staged(catalog, layout, sealer)}
    if any(done.values()):
        log.info("recovered %s", " ".join(f"{k}={v}" for k, v in done.items()))
    return done
