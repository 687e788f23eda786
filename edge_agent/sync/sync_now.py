"""`edge-agent sync now` reaching the running daemon: the CLI writes `SYNC_NOW_META` (ms) into the catalog's
meta table; the uplink polls it and retries at once when it changes."""

from __future__ import annotations

import logging

from edge_agent.catalog import Catalog

log = logging.getLogger(__name__)

SYNC_NOW_META = "sync_now_ms"   # set by `edge-agent sync now`; the running daemon polls it


class SyncNowWatch:
    """Notices a new `sync now` request since it was created (earlier requests were for an earlier daemon)."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._seen = catalog.meta_get(SYNC_NOW_META)

    def requested(self) -> bool:
        """True once per new request."""
        value = self.catalog.meta_get(SYNC_NOW_META)
        if value == self._seen:
            return False
        self._seen = value
        log.info("sync now requested at %s", value)
        return True
