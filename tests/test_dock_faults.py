"""A dock slot never fails silently: an internal error stops that volume with an alarm, deletes nothing,
leaves the other slots working, and a re-dock retries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_agent.ingest import Ingestor
from tests.evidence_support import offline_agent_config, running_agent
from tests.helpers import make_recorder_volume, wait_for


def test_an_internal_error_in_one_slot_is_an_alarm_and_the_other_slots_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dock = tmp_path / "dock"
    dock.mkdir()
    _, config = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(dock),
                                                        "settle_s": 0, "rescan_s": 0.2}])
    genuine = Ingestor.ingest_batch

    def faulty(self: Ingestor, items, abort=None):  # noqa: ANN001 - the real signature
        if any(record.volume_label == "BROKEN" for record, _ in items):
            raise RuntimeError("injected fault")
        return genuine(self, items, abort)

    monkeypatch.setattr(Ingestor, "ingest_batch", faulty)
    staged = tmp_path / "staged"
    make_recorder_volume(staged, "BROKEN", {"DCIM/A.MP4": 4_000})
    make_recorder_volume(staged, "FINE", {"DCIM/B.MP4": 4_000})
    with running_agent(config) as agent:
        shutil.move(staged / "BROKEN", dock / "BROKEN")
        shutil.move(staged / "FINE", dock / "FINE")
        alarm = wait_for(lambda: [a for a in agent.catalog.active_alarms() if a["kind"] == "dock_fault"],
                         what="a dock_fault alarm")[0]
        assert "BROKEN" in alarm["message"] and "injected fault" in alarm["message"]
        wait_for(lambda: agent.catalog.files(states=["sealed"], where="volume_label = 'FINE'"), what="FINE sealed")
        broken = {s.label: s for s in agent.docks.slots()}["BROKEN"]
        assert broken.state == "error" and "injected fault" in (broken.last_error or "")
    assert (dock / "BROKEN" / "DCIM" / "A.MP4").read_bytes()  # nothing deleted from the recorder

    monkeypatch.setattr(Ingestor, "ingest_batch", genuine)
    with running_agent(config) as agent:  # docked again (present at start): the retry seals it
        wait_for(lambda: agent.catalog.files(states=["sealed"], where="volume_label = 'BROKEN'"),
                 what="BROKEN sealed after re-dock")
