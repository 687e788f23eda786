"""A dock slot's state: one locked setter shared by two threads, `undocked` final, an undocked slot gone from
health; the one slot-numbering rule of every dock driver; an import as a service call the CLI only renders."""

from __future__ import annotations

import threading
from pathlib import Path

import jsonschema
import pytest

from drivers.base import DockedVolume, free_slot
from edge_agent.catalog import Catalog
from edge_agent.daemon import Agent
from edge_agent.protocol.wire import schema
from edge_agent.services.intake import IntakeRefused, import_folder
from edge_agent.sources.docks import SlotState, SlotStatus
from tests.helpers import agent_config, make_recorder_volume, wait_for


def slot() -> SlotStatus:
    return SlotStatus(dock="bench", slot=1, label="VOL1", docked_ms=1)


def test_a_slot_starts_identifying_and_its_setter_sets_state_and_error_together() -> None:
    status = slot()
    assert status.state is SlotState.IDENTIFYING and status.state == "identifying"
    assert status.set_state(SlotState.PAUSED, error="store full") is True
    assert (status.state, status.last_error) == (SlotState.PAUSED, "store full")
    assert status.set_state(SlotState.INGESTING) and status.last_error == "store full"  # no error: kept


def test_undocked_is_final_whatever_the_worker_still_writes() -> None:
    status = slot()
    assert status.set_state(SlotState.UNDOCKED)
    for late in (SlotState.INGESTING, SlotState.DONE, SlotState.ERROR, SlotState.PAUSED):
        assert status.set_state(late, error="late") is False
    assert (status.state, status.last_error) == (SlotState.UNDOCKED, None)


def test_an_undock_racing_a_busy_worker_always_wins() -> None:
    status, stop = slot(), threading.Event()

    def worker() -> None:
        while not stop.is_set():
            status.set_state(SlotState.INGESTING)
            status.set_state(SlotState.DONE)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        status.set_state(SlotState.UNDOCKED)
        assert status.snapshot().state is SlotState.UNDOCKED
    finally:
        stop.set()
        thread.join()
    assert status.state is SlotState.UNDOCKED


def test_a_snapshot_is_a_copy_another_thread_may_keep() -> None:
    status = slot()
    status.refused.append("a: symlink")
    copy = status.snapshot()
    status.refused.append("b: symlink")
    status.files_done = 3
    assert copy.refused == ["a: symlink"] and copy.files_done == 0 and copy.label == "VOL1"
    assert copy.set_state(SlotState.DONE) and status.state is SlotState.IDENTIFYING  # its own lock and state


def test_health_entry_matches_the_health_schema_and_names_the_state_as_a_string() -> None:
    status = slot()
    status.set_state(SlotState.INGESTING)
    status.files_total, status.files_done, status.rate_bps = 5, 2, 1234.56
    entry = status.health()
    jsonschema.validate(entry, schema("health")["properties"]["docks"]["items"])
    assert type(entry["state"]) is str and entry["state"] == "ingesting"
    assert (entry["files_pending"], entry["rate_bps"]) == (3, 1234.6)


def volume(slot_no: int | None) -> DockedVolume:
    return DockedVolume(dock="d", path=Path("/nonexistent"), label=f"v{slot_no}", slot=slot_no)


def test_every_driver_numbers_slots_lowest_free_first() -> None:
    assert free_slot([]) == 1
    assert free_slot([volume(1), volume(2)]) == 3
    assert free_slot([volume(1), volume(3)]) == 2            # a slot freed by an undock is taken next
    assert free_slot([volume(2), volume(None)]) == 1


def test_an_undocked_slot_leaves_health_at_once(tmp_path: Path) -> None:
    dock = tmp_path / "dock"
    _, cfg = agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(dock),
                                             "settle_s": 0, "rescan_s": 0.1}])
    agent = Agent(cfg, dock_drivers=[])
    try:
        path = make_recorder_volume(dock, "VOL1", {"DCIM/A.MP4": 2_000})
        docked = DockedVolume(dock="bench", path=path, label="VOL1", slot=1)
        agent.docks.docked(docked)
        assert agent.docks.wait_idle(30)
        (entry,) = agent.docks.health()["docks"]
        assert (entry["label"], entry["state"], entry["files_pending"]) == ("VOL1", "done", 0)
        agent.docks.undocked(docked)
        assert agent.docks.slots() == [] and agent.docks.health() == {"docks": []}
        wait_for(lambda: not any(t.name.startswith("dock-bench") for t in threading.enumerate()),
                 what="the slot's worker ended")
        assert agent.docks.health() == {"docks": []}
    finally:
        agent.docks.stop()
        agent.catalog.close()


def test_import_folder_seals_a_folder_and_reports_progress(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 3_000, "DCIM/B.MP4": 5_000})
    progress: list[tuple[int, int]] = []
    result = import_folder(cfg, card, device_id="ZFY0900", officer_id="320102001", reason="handed in",
                           on_progress=lambda done, total: progress.append((done, total)))
    assert (result.files_total, result.files_done, result.bytes_copied, result.error) == (2, 2, 8_000, None)
    assert result.device_id == "ZFY0900" and result.session_id and result.files_missing == 0
    assert progress[0] == (0, 8_000) and progress[-1] == (8_000, 8_000)
    catalog = Catalog(cfg.catalog_path, readonly=True)
    try:
        rows = catalog.files(states=["sealed"])
        assert {(r.dock, r.device_id, r.officer_id, r.session_id) for r in rows} == {
            ("import", "ZFY0900", "320102001", result.session_id)}
    finally:
        catalog.close()


def test_import_folder_refuses_what_is_not_a_folder_before_writing_anything(tmp_path: Path) -> None:
    _, cfg = agent_config(tmp_path)
    (tmp_path / "file.mp4").write_bytes(b"x")
    with pytest.raises(IntakeRefused, match="is not a folder"):
        import_folder(cfg, tmp_path / "file.mp4", device_id="D1", officer_id=None, reason=None)
    assert not cfg.agent.data_dir.exists()
