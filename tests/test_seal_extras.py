"""Source extras live on the catalog row: stored at discovery, merged into the manifest by the sealer (also
when crash recovery seals), and the gap ledger's repository answers the coverage questions."""

from __future__ import annotations

from pathlib import Path

from edge_agent.catalog import LANE_CAMERA, Catalog, State
from edge_agent.catalog.gaps import Gap, Gaps
from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import file_manifest, read_document, verify_signature
from edge_agent.sources.cameras import GapLedger, gaps, was_recording
from tests.evidence_support import offline_agent_config
from tests.helpers import make_recorder_volume

EXTRAS = {"camera": {"name": "gate", "location": "鼓楼区中山路口", "location_kind": "intersection"},
          "gaps_before": [{"id": 1, "camera": "gate", "start_ms": 1000, "end_ms": 2000, "cause": "stream_lost",
                           "detail": None}]}


def test_extras_stored_at_discovery_are_signed_into_the_manifest_also_when_recovery_seals(tmp_path: Path) -> None:
    _, cfg = offline_agent_config(tmp_path)
    volume = make_recorder_volume(tmp_path / "spool", "gate", {"2000.mkv": 5_000, "9000.mkv": 5_000})
    agent = Agent(cfg, dock_drivers=[])
    agent.layout.create()
    records = {}
    for name, extras in (("2000.mkv", EXTRAS), ("9000.mkv", None)):
        st = (volume / name).stat()
        records[name], created = agent.catalog.discover(
            kind="camera", device_id="CAM1", original_path=f"gate/{name}", source_path=str(volume / name),
            source_size=st.st_size, source_mtime_ns=st.st_mtime_ns, lane=LANE_CAMERA, extras=extras)
        assert created
    assert records["2000.mkv"].extras == '{"camera":{"location":"鼓楼区中山路口","location_kind":"intersection",' \
        '"name":"gate"},"gaps_before":[{"camera":"gate","cause":"stream_lost","detail":null,"end_ms":2000,' \
        '"id":1,"start_ms":1000}]}'   # canonical JSON
    assert records["9000.mkv"].extras is None
    # Staged, then "killed" before sealing: recovery seals from the row alone.
    for name, record in records.items():
        agent.ingestor.stage(record, volume / name)
    assert agent.ingestor.recover()["resealed"] == 2
    for name, record in records.items():
        sealed = agent.catalog.get(record.file_id)
        assert sealed.state == State.SEALED
        doc = read_document(agent.layout.manifest_path(record.file_id))
        verify_signature(doc, agent.key.public)
        if name == "2000.mkv":
            assert doc["camera"] == EXTRAS["camera"] and doc["gaps_before"] == EXTRAS["gaps_before"]
        else:
            assert "camera" not in doc and "gaps_before" not in doc
        # The signed fields are exactly the row's manifest, and the agent's clock as read at sealing.
        body = {k: v for k, v in doc.items() if k not in ("prev", "key_id", "sig", "clock")}
        assert body == agent.sealer.manifest_body(sealed) and doc["clock"]["source"] == "kernel"
    agent.catalog.close()


def test_file_manifest_keys_and_extras_come_last(tmp_path: Path) -> None:
    _, cfg = offline_agent_config(tmp_path)
    catalog = Catalog(tmp_path / "c.db")
    record, _ = catalog.discover(kind="recorder", device_id="D", original_path="a.mp4", source_path=None,
                                 source_size=1, source_mtime_ns=1, recorded_start_ms=0)
    body = file_manifest(record, {"container": "mp4"}, {"retention": "extra-wins", "camera": {"name": "x"}},
                         agent=cfg.agent, model="M", serial="S", chunk_size=4096)
    assert set(body) == {"v", "type", "file_id", "agent_id", "site_id", "unit", "source", "officer_id", "case_id",
                         "party", "recorded_start", "recorded_end", "recorded_start_ms", "recorded_end_ms",
                         "ingested_at", "clock_offset_ms", "size", "sha256", "chunk_size", "media", "retention",
                         "camera"}
    assert body["retention"] == "extra-wins" and body["source"]["model"] == "M" and body["chunk_size"] == 4096
    assert body["recorded_start"] is not None and body["recorded_start"].startswith("19")
    catalog.close()


def test_gap_repository_and_ledger(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "c.db")
    ledger = GapLedger(catalog, lambda camera: f"dev-{camera}")
    first = ledger.open("gate", 1000, "stream_lost", "timeout")
    assert Gaps(catalog).last_open("gate") == first
    first = ledger.note(first, "connection refused")
    closed = ledger.close(first, 500)            # never ends before it starts
    assert closed == Gap(first.id, "gate", 1000, 1000, "stream_lost", "connection refused")
    second = ledger.close(ledger.open("gate", 3000, "clock_step", "stepped"), 4000)
    assert gaps(catalog, "gate") == [closed, second]
    assert gaps(catalog, "gate", 3500, 3600) == [second] and gaps(catalog, "other") == []
    assert ledger.ended_at("gate", 4000) == [second] and ledger.ended_at("gate", 3999) == []
    assert Gaps(catalog).last_open("gate") is None
    assert was_recording(catalog, "gate", 3500) == (False, second, None)
    assert was_recording(catalog, "gate", 5000) == (False, None, None)
    segment, _ = catalog.discover(kind="camera", device_id="dev-gate", original_path="gate/4000.mkv",
                                  source_path=None, source_size=1, source_mtime_ns=1, recorded_start_ms=4000,
                                  recorded_end_ms=6000)
    catalog.discover(kind="camera", device_id="dev-gate0", original_path="gate0/1.mkv", source_path=None,
                     source_size=1, source_mtime_ns=1, recorded_start_ms=4000, recorded_end_ms=9000)
    assert was_recording(catalog, "gate", 5000) == (True, None, segment.file_id)
    assert Gaps(catalog).segments_since("gate", 4000) == 1 and Gaps(catalog).segments_since("gate", 4001) == 0
    assert Gaps(catalog).last_segment_end("gate") == 6000 and Gaps(catalog).last_segment_end("nope") is None
    assert ledger.downtime("nope", []) is None             # never recorded: no downtime to account for
    down = ledger.downtime("gate", [5500])                    # the last segment ended at 6000
    assert (down.start_ms, down.end_ms, down.cause) == (6000, None, "agent_stopped")
    assert ledger.downtime("gate", [9000]) == down            # left open by the last run: the same gap
    events = [r["payload"] for r in catalog.query("SELECT payload FROM outbox ORDER BY id")]
    assert len(events) == 5 and all('"device_id":"dev-gate"' in e.replace(": ", ":") for e in events)
    catalog.close()
