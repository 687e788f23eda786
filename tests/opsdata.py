"""Builders for operations tests: real files through the real ingest pipeline, then real state transitions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_agent.catalog import FileRecord, State
from edge_agent.clock import now_ms
from edge_agent.daemon import Agent
from edge_agent.durable import atomic_write
from edge_agent.evidence.manifest import canonical_json
from edge_agent.evidence.receipts import receipt_body
from edge_agent.platform.receiver.receipts import ReceiverKey


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


def receiver_key_dir(agent: Agent) -> Path:
    """Where the test receiver's receipt key lives: beside the agent's data dir (pin its .pub to verify)."""
    return agent.layout.data_dir.parent / "receiver-key"


def signed_receipt(agent: Agent, record: FileRecord, **override: Any) -> dict[str, Any]:
    """The receipt a real receiver would sign for `record` (fields overridable, to forge one)."""
    body = receipt_body("complete", agent_id=agent.config.agent.id, file_id=record.file_id, sha256=record.sha256,
                        size=record.size, manifest_sha256=record.manifest_sha256, ts_ms=now_ms())
    return ReceiverKey.load_or_create(receiver_key_dir(agent)).sign({**body, **override})


def confirm(agent: Agent, file_id: str, synced_ms: int | None = None) -> FileRecord:
    """The transitions (and the receipt kept beside the manifest and in the catalog) the uplink makes when the
    receiver acks a matching SHA-256 with its signed receipt."""
    record = agent.catalog.transition(file_id, State.SENDING, expect=State.SEALED, actor="test")
    receipt = signed_receipt(agent, record)
    atomic_write(agent.layout.receipt_path(file_id), canonical_json(receipt))
    agent.catalog.receipts.put(file_id, receipt)
    return agent.catalog.transition(file_id, State.SYNCED, expect=State.SENDING, actor="test",
                                    reason="receiver confirmed a matching SHA-256",
                                    synced_ms=now_ms() if synced_ms is None else synced_ms)
