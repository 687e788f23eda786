"""The uplink's composition without a broker: its health section, the sync queue it reports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.catalog import Catalog, State
from edge_agent.clock import iso_ms as iso
from edge_agent.layout import StoreLayout
from edge_agent.sync import SYNC_NOW_META, Uplink
from tests.helpers import agent_config

SHA = "ab" * 32


@pytest.fixture
def uplink(tmp_path: Path) -> Iterator[Uplink]:
    _, cfg = agent_config(tmp_path)
    layout = StoreLayout(cfg.agent.data_dir)
    layout.create()
    catalog = Catalog(cfg.catalog_path)
    yield Uplink(catalog, layout, cfg, version="test")
    catalog.close()


def _seal(catalog: Catalog, name: str, size: int) -> str:
    record, _ = catalog.discover(kind="recorder", device_id="A123456", original_path=f"DCIM/{name}.MP4",
                                 source_path=None, source_size=size, source_mtime_ns=1)
    catalog.transition(record.file_id, State.STAGED, sha256=SHA, size=size, store_path=f"store/{name}")
    catalog.transition(record.file_id, State.SEALED, manifest_sha256=SHA)
    return record.file_id


def test_health_is_the_sync_section_the_snapshot_built_from_stats(uplink: Uplink) -> None:
    uplink.last_ack_ms = 1_700_000_000_123
    sync = uplink.stats()
    # What ops/health.py built from `agent.uplink.stats()` before Uplink had a health() of its own.
    expected = {"connected": bool(sync.get("connected")), "rate_bps": sync.get("rate_bps"),
                "last_ack_ms": sync.get("last_ack_ms"), "last_ack": iso(sync.get("last_ack_ms")),
                "bytes_sent": sync.get("bytes_sent"), "in_flight": sync.get("in_flight"), "configured": True,
                "chain": {"head_seq": 0, "receipted_seq": None, "receipted_checkpoint_seq": None, "refused": None}}
    assert uplink.health() == {"sync": expected}
    uplink.last_ack_ms = None
    assert uplink.health()["sync"]["last_ack"] is None and uplink.health()["sync"]["connected"] is False


def test_stats_count_the_files_waiting_for_upload(uplink: Uplink) -> None:
    first = _seal(uplink.catalog, "a", 10)
    _seal(uplink.catalog, "b", 32)
    uplink.catalog.transition(first, State.SENDING)
    stats = uplink.stats()
    assert (stats["queue_files"], stats["queue_bytes"]) == (2, 42)
    assert stats["in_flight"] == 0 and stats["bytes_sent"] == 0


def test_sync_now_meta_is_exported_for_the_cli() -> None:
    assert SYNC_NOW_META == "sync_now_ms"


def test_the_window_keeps_within_what_the_receiver_queues_of_this_agent(tmp_path: Path) -> None:
    """A receiver drops an agent's messages beyond its share of its queue (`max_queued`, `max_queued_bytes` in its
    acks), and a dropped chunk waits out the ack timeout: the sender keeps its chunks in flight within that share,
    within the share of receivers before those fields (64 MiB, 256 messages) when an ack does not say, and within
16 chunks until the first ack."""
    from edge_agent.protocol.wire import Ack

    _, cfg = agent_config(tmp_path, mqtt={"window": 1024, "chunk_kib": 512})
    layout = StoreLayout(cfg.agent.data_dir)
    layout.create()
    catalog = Catalog(cfg.catalog_path)
    try:
        sender = Uplink(catalog, layout, cfg, version="test").sender
        frame = 512 * 1024 + 4 + 4096   # a chunk, its header length and at most MAX_HEADER_BYTES of header
        legacy = 64 * 2**20 // frame - 1
        assert sender.window_now == 16   # nothing heard yet: little enough for any receiver
        sender.heard(Ack("0" * 26, "receiving", []))   # a receiver before the fields
        assert sender.window_now == legacy == 126
        sender.heard(Ack("0" * 26, "receiving", [], max_queued=512, max_queued_bytes=192 * 2**20))
        assert sender.window_now == 192 * 2**20 // frame - 1 == 380
        sender.heard(Ack("0" * 26, "receiving", [], max_queued=40, max_queued_bytes=192 * 2**20))
        assert sender.window_now == 40 - 32   # manifests, queries and chain documents queue there too
        sender.heard(Ack("0" * 26, "receiving", [], max_queued=512, max_queued_bytes=1000))
        assert sender.window_now == 1
        sender.heard(Ack("0" * 26, "receiving", []))   # a receiver before the fields (behind a shared subscription)
        assert sender.window_now == legacy
    finally:
        catalog.close()

    (tmp_path / "small").mkdir()
    _, small = agent_config(tmp_path / "small", mqtt={"window": 64})
    layout = StoreLayout(small.agent.data_dir)
    layout.create()
    catalog = Catalog(small.catalog_path)
    try:
        sender = Uplink(catalog, layout, small, version="test").sender
        assert sender.window_now == 16
        sender.heard(Ack("0" * 26, "receiving", [], max_queued=512, max_queued_bytes=192 * 2**20))
        assert sender.window_now == 64   # never beyond mqtt.window
    finally:
        catalog.close()


def test_chunks_lost_on_the_way_halve_the_window_and_acks_give_it_back_one_by_one(tmp_path: Path) -> None:
    """A broker whose queue for the receivers is full drops QoS 1 messages, and nothing tells the agent but the
    ack timeout: a file that timed out with chunks out halves the window (once for all the files that timed out
    together, never below 16), and each ack after gives one chunk back, up to the receiver's share."""
    import os
    import threading

    from edge_agent.protocol.wire import Ack
    from edge_agent.sync.sender import Outgoing
    from edge_agent.sync.transfer import Phase, Transfer

    _, cfg = agent_config(tmp_path, mqtt={"window": 256, "chunk_kib": 512})
    layout = StoreLayout(cfg.agent.data_dir)
    layout.create()
    catalog = Catalog(cfg.catalog_path)
    sender = Uplink(catalog, layout, cfg, version="test").sender
    try:
        share = Ack("0" * 26, "receiving", [], max_queued=512, max_queued_bytes=192 * 2**20)
        sender.heard(share)
        assert sender.window_now == 256
        for n in range(2):   # two files, each with chunks out, silent past the ack timeout
            file_id = _seal(catalog, f"F{n}", 8 << 20)
            copy = tmp_path / f"F{n}"
            copy.write_bytes(b"")
            transfer = Transfer(file_id, 8 << 20, SHA, 512 * 1024, last_heard=0.0, phase=Phase.STREAMING)
            transfer.outstanding = {0: 0.0, 1: 0.0}
            sender.files[file_id] = Outgoing(catalog.get(file_id), b"{}", copy, os.open(copy, os.O_RDONLY),
                                             transfer)
        sender._connected = threading.Event()   # noqa: SLF001 - offline: the query is not published
        sender.check_timeouts(now=sender.ack_timeout_s + 1)
        assert sender.window_now == 128, "two files timed out together: one loss, one halving"
        sender.check_timeouts(now=sender.ack_timeout_s + 2)   # nothing out any more (querying): no new loss
        assert sender.window_now == 128
        for expected in range(129, 257):
            sender.heard(share)
            assert sender.window_now == expected
        sender.heard(share)
        assert sender.window_now == 256, "never beyond the share"
        for _ in range(8):
            sender.lost()
        assert sender.window_now == 16
    finally:
        for outgoing in sender.files.values():
            outgoing.close()
        catalog.close()


def test_under_a_bandwidth_cap_the_ack_timeout_covers_paho_s_queue_not_the_whole_window(tmp_path: Path) -> None:
    """A chunk the broker has PUBACKed is past the capped link: the ack timeout waits for what paho holds (at most
    CHUNKS_IN_CLIENT chunks) to cross it, not for the whole window (256 chunks of 512 KiB: 268 s at 4 Mbit/s, so a
    lost chunk went unnoticed for four and a half minutes)."""
    from edge_agent.sync.sender import CHUNKS_IN_CLIENT, ack_timeout_s

    _, cfg = agent_config(tmp_path, mqtt={"window": 256, "chunk_kib": 512, "bandwidth_kbps": 4000,
                                          "ack_timeout_s": 15})
    paho_queue_s = CHUNKS_IN_CLIENT * 512 * 1024 / 500_000
    assert ack_timeout_s(cfg.mqtt) == pytest.approx(15 + paho_queue_s) and ack_timeout_s(cfg.mqtt) < 60
    small = cfg.mqtt.model_copy(update={"window": 8})
    assert ack_timeout_s(small) == pytest.approx(15 + 8 * 512 * 1024 / 500_000)
    assert ack_timeout_s(cfg.mqtt.model_copy(update={"bandwidth_kbps": None})) == 15
