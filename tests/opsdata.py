"""Builders for operations tests: real files through the real ingest pipeline, then real state transitions."""

from __future__ import annotations

import os
from pathlib import Path

from edge_agent.catalog import FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.daemon import Agent


def ingest_file(agent: Agent, source_dir: Path, name: str, size: int = 4096, *, device: str = "DSJ-A1-0001",
                recorded_start_ms: int | None = None) -> FileRecord:
    """Write a source file and take it through discover -> staged -> sealed."""
    source_dir.mkdir(parents=True, exist_ok=True)
    path = source_dir / name
    path.write_bytes(os.urandom(size))
    st = path.stat()
    record, _ = agent.catalog.discover(kind="recorder", device_id=device, original_path=name, source_path=str(path),
                                       source_size=st.st_size, source_mtime_ns=st.st_mtime_ns,
                                       recorded_start_ms=recorded_start_ms or now_ms(), actor="test")
    return agent.ingestor.ingest(record, path)


def confirm(agent: Agent, file_id: str, synced_ms: int | None = None) -> FileRecord:
    """The transitions the uplink makes when the receiver acks a matching SHA-256."""
    agent.catalog.transition(file_id, State.SENDING, expect=State.SEALED, actor="test")
    return agent.catalog.transition(file_id, State.SYNCED, expect=State.SENDING, actor="test",
                                    reason="receiver confirmed a matching SHA-256",
                                    synced_ms=now_ms() if synced_ms is None else synced_ms)
