"""Ingest: stage -> hash -> verify -> seal (DESIGN.md section 2).

- `stage`: `Ingestor` copies a source into the store with its SHA-256 in one pass and proves the copy;
  `ingest_batch` takes many small files with one fsync round and one transaction per step (`Ingested`).
- `seal`: `Sealer` signs the manifest built from the catalog row and chains it.
- `recover`: puts the store back in line with the catalog after a crash (`Ingestor.recover`).
- `errors`: the ways an ingest stops (`IngestError` and its kinds), each saying what to do.
"""

from edge_agent.ingest.errors import CopyMismatch, IngestError, IntakePaused, SourceGone, SourceUnreadable
from edge_agent.ingest.seal import Sealer
from edge_agent.ingest.stage import Ingested, Ingestor, probe_media

__all__ = ["CopyMismatch", "IngestError", "Ingested", "Ingestor", "IntakePaused", "Sealer", "SourceGone",
           "SourceUnreadable", "probe_media"]
