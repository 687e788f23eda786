"""What a docked recorder volume holds is accounted for, file by file, and a file is who its bytes say.

Identity by content: a recording with the name, size and mtime of one already collected but other bytes is a
new file (with an `identity_collision` event naming both); the same bytes docked again are not a second file
and are cleared only after their verified ack. Every regular file on the volume is collected, in the model's
order of priority, except the model's system files, which the signed session manifest lists with the rule
that excluded them; a file that cannot be read is an `uncollected_files` alarm and the slot is never done.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.catalog import Catalog
from edge_agent.evidence.manifest import read_document, verify_signature
from edge_agent.sources.docks import SlotState
from tests import sync_support as sync
from tests.evidence_support import offline_agent_config, running_agent, sha256_of, wait_states
from tests.helpers import make_recorder_volume, unreadable, wait_for

IDENTITY = {"DeviceID": "A123456", "PoliceID": "320102999", "SerialNo": "ZFY0500"}   # a ZFY-GA-2016's DEVICE.INI
CLIP = "DCIM/100MEDIA/FILE0001.MP4"


def directory_dock(tmp_path: Path, **dock: object):
    root = tmp_path / "dock"
    root.mkdir()
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root),
                                                    "settle_s": 0, "rescan_s": 0.2, **dock}])
    return cfg, root


def events(catalog: Catalog, kind: str) -> list[dict]:
    payloads = [json.loads(r["payload"]) for r in catalog.query("SELECT payload FROM outbox ORDER BY id")]
    return [p for p in payloads if p.get("kind") == kind]


def undock(catalog: Catalog, volume: Path) -> Path:
    """Take the volume out of the dock (renamed hidden, as a recorder pulled); returns where it is now."""
    away = volume.with_name("." + volume.name)
    os.rename(volume, away)
    wait_for(lambda: catalog.query("SELECT 1 FROM sessions WHERE state = 'undocked'"), what="session undocked")
    return away


def session_doc(agent, session_id: str) -> dict:  # noqa: ANN001 - the running Agent
    doc = read_document(agent.layout.session_manifest_path(session_id))
    verify_signature(doc, agent.key.public)
    return doc


def test_a_twin_with_the_name_size_and_mtime_of_a_collected_file_but_other_bytes_is_a_new_file(
        tmp_path: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    first = os.urandom(3 << 20)
    volume = make_recorder_volume(root, "ZFY0500", {CLIP: first}, identity=IDENTITY)
    mtime_ns = (volume / CLIP).stat().st_mtime_ns
    with running_agent(cfg) as agent:
        (old,) = wait_states(agent.catalog, 1)
        away = undock(agent.catalog, volume)
        # The recorder's clock was reset and the card reused: a new recording, same name, size and mtime.
        second = first[:1 << 19] + os.urandom(len(first) - (1 << 19))     # the same header, other bytes
        (away / CLIP).write_bytes(second)
        os.utime(away / CLIP, ns=(mtime_ns, mtime_ns))
        os.rename(away, volume)
        sealed = wait_states(agent.catalog, 2)
        new = next(r for r in sealed if r.file_id != old.file_id)
        assert (new.original_path, new.source_size, new.source_mtime_ns) == (
            old.original_path, old.source_size, old.source_mtime_ns)
        assert new.sha256 == hashlib.sha256(second).hexdigest() != old.sha256 == hashlib.sha256(first).hexdigest()
        assert new.sha256 == sha256_of(agent.layout.data_dir / new.store_path)
        (event,) = events(agent.catalog, "identity_collision")
        assert (event["file_id"], event["twin_file_ids"]) == (new.file_id, [old.file_id])
        assert "check the recorder's clock" in event["message"]
        audit = agent.catalog.query("SELECT detail FROM audit WHERE action = 'file.identity_collision'")
        assert json.loads(audit[0]["detail"])["twins"] == [old.file_id]


def test_a_twin_that_differs_from_a_collected_file_only_in_its_middle_is_a_new_file(tmp_path: Path) -> None:
    # Its first and last MiB (the fingerprint) are the old file's: only the full SHA-256 tells them apart.
    cfg, root = directory_dock(tmp_path)
    first = os.urandom(3 << 20)
    volume = make_recorder_volume(root, "ZFY0503", {CLIP: first}, identity=IDENTITY)
    mtime_ns = (volume / CLIP).stat().st_mtime_ns
    with running_agent(cfg) as agent:
        (old,) = wait_states(agent.catalog, 1)
        away = undock(agent.catalog, volume)
        second = first[:1 << 20] + os.urandom(1 << 20) + first[2 << 20:]
        (away / CLIP).write_bytes(second)
        os.utime(away / CLIP, ns=(mtime_ns, mtime_ns))
        os.rename(away, volume)
        sealed = wait_states(agent.catalog, 2)
        new = next(r for r in sealed if r.file_id != old.file_id)
        assert new.sha256 == hashlib.sha256(second).hexdigest() != old.sha256
        assert new.sha256 == sha256_of(agent.layout.data_dir / new.store_path)
        assert new.source_fingerprint.startswith(old.source_fingerprint + "+")
        (event,) = events(agent.catalog, "identity_collision")
        assert (event["file_id"], event["twin_file_ids"]) == (new.file_id, [old.file_id])
        # Docked once more, the second recording is known: no third file, no second collision.
        away = volume.with_name("." + volume.name)
        os.rename(volume, away)
        wait_for(lambda: len(agent.catalog.query("SELECT 1 FROM sessions WHERE state = 'undocked'")) == 2,
                 what="second session undocked")
        os.rename(away, volume)
        wait_for(lambda: len(agent.catalog.query("SELECT 1 FROM sessions WHERE manifest_sha256 IS NOT NULL")) == 3,
                 what="the third session sealed")
        assert len(agent.catalog.files()) == 2 and len(events(agent.catalog, "identity_collision")) == 1


def test_the_same_content_docked_again_is_not_a_second_file(tmp_path: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    volume = make_recorder_volume(root, "ZFY0501", {CLIP: 300_000, "DCIM/100MEDIA/FILE0002.MP4": 5_000},
                                  identity=IDENTITY)
    with running_agent(cfg) as agent:
        before = {r.original_path: r.file_id for r in wait_states(agent.catalog, 2)}
        away = undock(agent.catalog, volume)
        later = time.time() - 5                       # re-dated (a vendor tool's copy, a clock fix): same bytes
        os.utime(away / CLIP, (later, later))
        os.rename(away, volume)
        wait_for(lambda: len(agent.catalog.query("SELECT 1 FROM sessions WHERE manifest_sha256 IS NOT NULL")) == 2,
                 what="the second session sealed")
        assert {r.original_path: r.file_id for r in agent.catalog.files()} == before
        second = agent.catalog.query("SELECT session_id FROM sessions ORDER BY docked_ms DESC LIMIT 1")[0][0]
        listed = {f["path"]: f for f in session_doc(agent, second)["volume_files"]}
        assert listed[CLIP]["status"] == "collected" and listed[CLIP]["file_id"] == before[CLIP]
        assert events(agent.catalog, "identity_collision") == []


@pytest.mark.slow
def test_content_docked_again_before_its_ack_is_cleared_only_once_the_receiver_confirmed_it(
        tmp_path: Path, mosquitto) -> None:  # noqa: ANN001 - the broker fixture
    dock = tmp_path / "dock"
    dock.mkdir()
    agent_toml, data_dir = sync.agent_setup(tmp_path, mosquitto.port, dock_root=dock)
    sync.enrol(agent_toml, tmp_path / "enrolled")
    volume = make_recorder_volume(dock / ".prep", "ZFY0502", {CLIP: 400_000}, identity=IDENTITY)
    original = sha256_of(volume / CLIP)
    agent = sync.agent_proc(tmp_path, agent_toml).start()              # no receiver yet: nothing is confirmed
    receiver = None
    try:
        os.rename(volume, dock / "ZFY0502")
        wait_for(lambda: sum(sync.states(data_dir).get(s, 0) for s in ("sealed", "sending")) == 1, 60,
                 what="sealed, not synced")
        os.rename(dock / "ZFY0502", volume)                       # undocked unconfirmed, re-dated, docked again
        wait_for(lambda: sync.catalog_rows(data_dir, "SELECT 1 FROM sessions WHERE state = 'undocked'"), 30,
                 what="session undocked")
        later = time.time() - 5
        os.utime(volume / CLIP, (later, later))
        os.rename(volume, dock / "ZFY0502")
        wait_for(lambda: len(sync.catalog_rows(data_dir, "SELECT 1 FROM sessions WHERE manifest_sha256 IS NOT NULL"))
                 == 2, 60, what="second session sealed")
        assert (dock / "ZFY0502" / CLIP).exists() and len(sync.catalog_rows(data_dir)) == 1   # not cleared, not twice
        store = tmp_path / "store"
        receiver = sync.receiver_proc(tmp_path, sync.receiver_setup(tmp_path, mosquitto.port, store,
                                                          tmp_path / "enrolled")).start()
        wait_for(lambda: sync.receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
        wait_for(lambda: sync.states(data_dir).get("source_cleared") == 1, 120,
                 what=f"cleared, have {sync.states(data_dir)}")
        assert not (dock / "ZFY0502" / CLIP).exists()
        ((sha,),) = sync.catalog_rows(data_dir, "SELECT sha256 FROM files")
        assert sha == original
        assert sync.catalog_rows(data_dir, "SELECT kind FROM alarms WHERE kind IN ('clear_refused',"
                                           " 'uncollected_files') OR cleared_ms IS NULL"
                                           " AND kind != 'volume_refused_entries'") == []
    finally:
        assert agent.stop() == 0
        if receiver is not None:
            assert receiver.stop() == 0


def test_photo_audio_and_gps_are_collected_recordings_first_and_system_files_listed_as_excluded(
        tmp_path: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    files = {"DCIM/100MEDIA/A123456_320102123_20261122080102.MP4": 200_000,
             "PHOTO/A123456_320102123_20261122080500.JPG": 30_000,
             "AUDIO/A123456_320102123_20261122081000.WAV": 40_000,
             "GPS/20261122.GPS": 2_000,
             "MISC/notes.txt": b"a file no glob names is evidence too",
             "FIRMWARE.BIN": 10_000, "LOG/system.log": b"boot ok\n"}
    make_recorder_volume(root, "ZFY0503", files, identity=IDENTITY)
    evidence = [p for p in files if p not in ("FIRMWARE.BIN", "LOG/system.log")]
    with running_agent(cfg) as agent:
        sealed = wait_states(agent.catalog, len(evidence))
        assert sorted(r.original_path for r in sealed) == sorted(evidence)
        (session,) = wait_for(lambda: agent.catalog.query("SELECT * FROM sessions WHERE manifest_sha256 IS NOT NULL"),
                              what="session manifest signed")
        doc = session_doc(agent, session["session_id"])
        listed = {f["path"]: f for f in doc["volume_files"]}
        assert sorted(listed) == sorted([*files, "DEVICE.INI"])          # every file on the volume, once
        for path in evidence:
            record = next(r for r in sealed if r.original_path == path)
            assert listed[path] == {"path": path, "status": "collected", "file_id": record.file_id,
                                    "sha256": record.sha256, "size": record.size}
        assert listed["FIRMWARE.BIN"]["status"] == "excluded" and "'*.bin'" in listed["FIRMWARE.BIN"]["rule"]
        assert "ZFY-GA-2016" in listed["FIRMWARE.BIN"]["rule"] and "LOG/**/*" in listed["LOG/system.log"]["rule"]
        assert listed["DEVICE.INI"]["status"] == "excluded" and "identity file" in listed["DEVICE.INI"]["rule"]
        staged = [r["subject"] for r in agent.catalog.query("SELECT subject FROM audit WHERE action = 'file.staged'"
                                                             " ORDER BY seq")]
        order = [agent.catalog.get(file_id).original_path.split("/")[0] for file_id in staged]
        assert order[0] == "DCIM"                  # the model's media_globs first, whatever the walk's order
        (slot,) = agent.docks.slots()
        assert slot.state is SlotState.DONE and not agent.catalog.active_alarms()


@pytest.fixture
def unreadable_recorder(tmp_path: Path) -> Iterator[Path]:
    """A recorder volume with one file whose open fails (EACCES, even for root)."""
    volume = make_recorder_volume(tmp_path / "dock", "ZFY0504", {
        "DCIM/100MEDIA/A123456_320102123_20261122080102.MP4": 50_000,
        "PHOTO/A123456_320102123_20261122080500.JPG": b"placeholder"}, identity=IDENTITY)
    with unreadable(volume / "PHOTO/A123456_320102123_20261122080500.JPG"):
        yield volume


def test_a_file_that_cannot_be_collected_is_an_alarm_and_the_recorder_is_never_done(
        tmp_path: Path, unreadable_recorder: Path) -> None:
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory",
                                                    "root": str(unreadable_recorder.parent), "settle_s": 0,
                                                    "rescan_s": 0.2}])
    with running_agent(cfg) as agent:
        alarm = wait_for(lambda: [a for a in agent.catalog.active_alarms() if a["kind"] == "uncollected_files"],
                         what="uncollected_files alarm")[0]
        assert "PHOTO/A123456_320102123_20261122080500.JPG" in alarm["message"] and "A123456" in alarm["message"]
        assert "nothing on it is cleared" in alarm["message"]
        (session,) = wait_for(lambda: agent.catalog.query("SELECT * FROM sessions WHERE manifest_sha256 IS NOT NULL"),
                              what="session manifest signed")
        listed = {f["path"]: f for f in session_doc(agent, session["session_id"])["volume_files"]}
        photo = listed["PHOTO/A123456_320102123_20261122080500.JPG"]
        assert photo["status"] == "uncollected" and "Permission denied" in photo["reason"]
        assert listed["DCIM/100MEDIA/A123456_320102123_20261122080102.MP4"]["status"] == "collected"
        seen: set[SlotState] = set()

        def retried_twice() -> bool:
            seen.update(s.state for s in agent.docks.slots())
            return bool(agent.catalog.files(where="original_path LIKE 'PHOTO/%' AND attempts >= 3"))

        wait_for(retried_twice, what="retried at the rescans")
        (slot,) = wait_for(lambda: [s for s in agent.docks.slots() if s.state is SlotState.ERROR], what="slot error")
        assert "not collected" in (slot.last_error or "") and SlotState.DONE not in seen


def test_the_source_identity_holds_twins_by_fingerprint_and_stays_unique_without_one(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    same = {"kind": "recorder", "device_id": "dev1", "original_path": CLIP, "source_path": None,
            "source_size": 10, "source_mtime_ns": 1}
    a, created_a = catalog.discover(**same, source_fingerprint="10:aa")
    b, created_b = catalog.discover(**same, source_fingerprint="10:bb")     # the twin: its own row
    again, created_again = catalog.discover(**same, source_fingerprint="10:aa")
    assert created_a and created_b and not created_again and again.file_id == a.file_id != b.file_id
    plain, _ = catalog.discover(**same)                                     # without a fingerprint: unique as before
    assert catalog.discover(**same) == (plain, False)
    with pytest.raises(sqlite3.IntegrityError), catalog.transaction() as conn:
        conn.execute("INSERT INTO files (file_id, state, kind, device_id, original_path, source_size,"
                     " source_mtime_ns, created_ms, updated_ms) VALUES ('x', 'discovered', 'recorder', 'dev1', ?,"
                     " 10, 1, 1, 1)", (CLIP,))
    assert [r.file_id for r in catalog.files.with_fingerprint("dev1", "10:bb")] == [b.file_id]
    assert {r.file_id for r in catalog.files.at_source("dev1", CLIP, 10, 1)} == {a.file_id, b.file_id, plain.file_id}
    catalog.close()


def _bytes_read_by_this_process() -> int:
    """Bytes passed to read(2)-like calls by every thread of this process, cached or not (/proc/self/io)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def test_a_file_just_copied_is_not_read_whole_again_by_the_passes_after_its_copy(tmp_path: Path) -> None:
    """A recording is read off the recorder once for its copy (and its copy once more from the store for the
    read-back): the passes that find it again on the volume know its full SHA-256 from that copy instead of
    reading the recorder a third time. A file added afterwards proves such a pass ran over it."""
    cfg, root = directory_dock(tmp_path)
    size = 32 << 20
    parked = make_recorder_volume(tmp_path / "parked", "ZFY0502", {CLIP: size}, identity=IDENTITY)
    with running_agent(cfg) as agent:
        before = _bytes_read_by_this_process()
        volume = root / parked.name
        os.rename(parked, volume)        # docked whole, as a recorder is plugged in
        wait_states(agent.catalog, 1)
        later = volume / "DCIM/100MEDIA/FILE0002.MP4"
        later.write_bytes(os.urandom(5000))
        wait_states(agent.catalog, 2)
        read = _bytes_read_by_this_process() - before
    # The copy and its read-back: 2 x size, plus the fingerprint (2 MiB) and the probe; a third whole read
    # of the recording would make it 3 x size.
    assert read < 2.5 * size, f"{read / 2**20:.1f} MiB read for a {size >> 20} MiB recording"



@pytest.mark.parametrize("point", ["fingerprint", "copy"])
def test_a_file_that_grows_while_it_is_listed_is_one_row_taken_at_its_final_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """A vendor's drop folder is written while the dock walks it (settle_s = 0): the recorder appends its last MiB
    either between the walk's stat and the file's fingerprint (the row took the walk's size, and its copy was
    refused as 'changed since it was listed' at every pass, forever), or after its row was made and before its
    copy (the next pass made a second row, and the first stayed 'discovered' for good, the recorder never done).
    Either way: one row, taken at the final size and content."""
    from edge_agent.ingest import stage
    from edge_agent.sources.docks import discovery
    module, name = (discovery, "fingerprint") if point == "fingerprint" else (stage, "copy_hashing")
    cfg, root = directory_dock(tmp_path)
    parked = make_recorder_volume(tmp_path / "parked", "ZFY0503", {CLIP: 3 << 20}, identity=IDENTITY)
    original, grown = getattr(module, name), []

    def appended_first(path: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the wrapped function's own
        if Path(path).name == Path(CLIP).name and not grown:
            with open(path, "ab") as out:
                out.write(os.urandom(1 << 20))
            grown.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(module, name, appended_first)
    with running_agent(cfg) as agent:
        os.rename(parked, root / parked.name)
        [record] = wait_states(agent.catalog, 1)
        assert grown, f"{name} was never called: the race was not exercised"
        final = root / parked.name / CLIP
        assert (record.size, record.sha256) == (4 << 20, sha256_of(final))
        rows = agent.catalog.query("SELECT file_id, state FROM files")
        assert [(r["file_id"], r["state"]) for r in rows] == [(record.file_id, "sealed")], [tuple(r) for r in rows]
