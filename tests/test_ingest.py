"""Ingest through a directory dock, the document chain, and crash recovery of the store against the catalog."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edge_agent.catalog import State
from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import GENESIS_PREV, read_document, verify_signature
from edge_agent.evidence.verify import verify_all
from tests.evidence_support import offline_agent_config, running_agent, sha256_of, wait_states
from tests.helpers import make_recorder_volume, wait_for

DH_FILES = {
    "2026/1122/320105001-20261122101500-DHA1B2C3D4.mp4": 250_000,
    "2026/1122/320105001-20261122103000-DHA1B2C3D4.wav": 40_000,
    "2026/1122/320105001-20261122104500-DHA1B2C3D4.jpg": 3_000,
}


def test_directory_dock_volume_is_sealed_hashed_signed_chained_and_tagged(tmp_path: Path) -> None:
    root = tmp_path / "dock-sim"
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root)}])
    with running_agent(cfg) as agent:
        volume = root / "DH-card-7"
        os.rename(make_recorder_volume(tmp_path / "parked", "DH-card-7", DH_FILES), volume)  # docks complete
        sealed = wait_states(agent.catalog, len(DH_FILES))
        wait_for(lambda: agent.catalog.query("SELECT 1 FROM sessions WHERE manifest_sha256 IS NOT NULL"),
                 what="session manifest")
        for record in sealed:
            assert record.sha256 == sha256_of(volume / record.original_path)
            stored = agent.layout.data_dir / record.store_path
            assert sha256_of(stored) == record.sha256 and stored.stat().st_mode & 0o222 == 0  # read-only
            assert (record.device_id, record.officer_id, record.dock) == ("DHA1B2C3D4", "320105001", "bench")
            assert source_untouched(volume / record.original_path, record.source_size, record.source_mtime_ns)
        documents = agent.catalog.query("SELECT * FROM documents ORDER BY seq")
        assert [d["kind"] for d in documents] == ["file"] * len(DH_FILES) + ["session"]
        prev = GENESIS_PREV
        for row in documents:
            raw = (agent.layout.data_dir / row["path"]).read_bytes()
            doc = read_document(agent.layout.data_dir / row["path"])
            verify_signature(doc, agent.key.public)
            assert doc["prev"] == prev and hashlib.sha256(raw).hexdigest() == row["sha256"]
            prev = row["sha256"]
        session = read_document(agent.layout.data_dir / documents[-1]["path"])
        assert sorted(f["original_path"] for f in session["files"]) == sorted(DH_FILES)
        assert session["device_id"] == "DHA1B2C3D4"
        assert verify_all(agent.catalog, agent.layout) == []
        # Docking the same card again adds nothing: one row per source file.
        os.rename(volume, tmp_path / "out")
        wait_for(lambda: agent.catalog.query("SELECT 1 FROM sessions WHERE state = 'undocked'"), what="undock")
        os.rename(tmp_path / "out", volume)
        wait_for(lambda: len(agent.catalog.query("SELECT 1 FROM sessions")) == 2, what="second session")
        assert agent.docks.wait_idle(30)
        assert len(agent.catalog.query("SELECT * FROM files")) == len(DH_FILES)


def source_untouched(path: Path, size: int | None, mtime_ns: int | None) -> bool:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns) == (size, mtime_ns)


def test_recovery_discards_partials_and_orphans_and_reseals_staged_files(tmp_path: Path) -> None:
    _, cfg = offline_agent_config(tmp_path)
    volume = make_recorder_volume(tmp_path / "card", "c", {"a.mp4": 10_000, "b.mp4": 20_000, "c.mp4": 30_000,
                                                           "d.mp4": 40_000})
    agent = Agent(cfg, dock_drivers=[])
    agent.layout.create()
    rec = {}
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        st = (volume / name).stat()
        rec[name], _ = agent.catalog.discover(kind="recorder", device_id="DEV1", original_path=name,
                                              source_path=str(volume / name), source_size=st.st_size,
                                              source_mtime_ns=st.st_mtime_ns)
    # a: killed mid-copy (a partial in staging/); b: killed after the rename into store/, before the row;
    # c: killed after `staged`, before sealing; d: staged, but its copy vanished from the store.
    agent.layout.staging_path(rec["a.mp4"].file_id).write_bytes(b"partial")
    orphan = agent.layout.media_path(rec["b.mp4"].file_id, ".mp4")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"renamed but never recorded")
    staged = agent.ingestor.stage(rec["c.mp4"], volume / "c.mp4")
    lost = agent.ingestor.stage(rec["d.mp4"], volume / "d.mp4")
    (agent.layout.data_dir / lost.store_path).unlink()
    done = agent.ingestor.recover()
    assert done == {"partials_removed": 1, "orphans_removed": 1, "resealed": 1}
    assert list(agent.layout.staging.iterdir()) == [] and not orphan.exists()
    assert agent.catalog.get(staged.file_id).state == State.SEALED
    assert agent.catalog.get(lost.file_id).state == State.DISCOVERED
    for name in ("a.mp4", "b.mp4", "d.mp4"):
        record = agent.ingestor.ingest(agent.catalog.get(rec[name].file_id), volume / name)
        assert record.state == State.SEALED and record.sha256 == sha256_of(volume / name)
    assert len(list(agent.layout.media.rglob("*.mp4"))) == 4
    assert verify_all(agent.catalog, agent.layout) == []
    agent.catalog.close()

