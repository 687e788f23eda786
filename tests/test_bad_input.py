"""G6: bad input on a recorder volume gets a clear error and changes nothing it should not."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.catalog import State
from edge_agent.evidence.manifest import read_document
from edge_agent.sources.recorders import check_relative
from tests.evidence_support import offline_agent_config, running_agent, sha256_of, wait_states
from tests.helpers import make_recorder_volume, unreadable, wait_for


def directory_dock(tmp_path: Path, **dock: object):
    root = tmp_path / "dock-sim"
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root),
                                           "rescan_s": 0.2, **dock}])
    return cfg, root


def events(catalog, kind: str) -> list[dict]:
    payloads = [json.loads(r["payload"]) for r in catalog.query("SELECT payload FROM outbox ORDER BY id")]
    return [p for p in payloads if p.get("kind") == kind]


def test_unidentifiable_recorder_is_ingested_as_unknown_with_an_alarm(tmp_path: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    volume = make_recorder_volume(tmp_path / "parked", "NO NAME", {"clip001.mp4": 30_000, "x/clip002.mp4": 500})
    with running_agent(cfg) as agent:
        os.rename(volume, root / "NO NAME")
        sealed = wait_states(agent.catalog, 2)
        assert {r.device_id for r in sealed} == {"unknown:NO NAME"}
        (alarm,) = agent.catalog.active_alarms()
        assert alarm["kind"] == "recorder_unidentified" and alarm["subject"] == "unknown:NO NAME"
        assert "could not be identified" in alarm["message"] and "recorders.toml" in alarm["message"]
        assert [e["state"] for e in events(agent.catalog, "recorder_unidentified")] == ["raised"]


def test_unsafe_names_are_refused_with_a_reason() -> None:
    assert "'..'" in check_relative("DCIM/../../etc/passwd")
    assert check_relative("/etc/passwd") == "absolute path"
    assert check_relative("DCIM/a\x07b.mp4") == "control character in file name"
    assert check_relative("DCIM/" + "x" * 300 + ".mp4") == "file name longer than 255 bytes"
    assert check_relative("DCIM/\udcff.mp4") == "file name is not valid UTF-8"
    assert check_relative("DCIM/100/ok.mp4") is None


def test_symlinks_devices_and_bad_names_are_never_followed_and_raise_an_alarm(tmp_path: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.mp4"
    secret.write_bytes(b"not the recorder's")
    before = (sha256_of(secret), secret.stat().st_mtime_ns)
    volume = make_recorder_volume(tmp_path / "parked", "HOSTILE", {"DCIM/good.mp4": 10_000})
    dcim = volume / "DCIM"
    (dcim / "absolute.mp4").symlink_to(secret)                               # absolute symlink
    (dcim / "relative.mp4").symlink_to(Path("../../../outside/secret.mp4"))  # climbs out of the volume
    (dcim / "inside.mp4").symlink_to("good.mp4")                              # even inside: never followed
    (dcim / "escape").symlink_to(outside, target_is_directory=True)          # a directory elsewhere
    (dcim / "ctl\x1b[2Jname.mp4").write_bytes(b"escape sequence in a name")
    (dcim / "new\nline.mp4").write_bytes(b"newline in a name")
    os.mkfifo(dcim / "fifo.mp4")
    os.mknod(dcim / "null.mp4", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with open(os.path.join(os.fsencode(dcim), b"latin1-\xe9.mp4"), "wb") as f:
        f.write(b"name is not UTF-8")
    with running_agent(cfg) as agent:
        os.rename(volume, root / "HOSTILE")
        (good,) = wait_states(agent.catalog, 1)
        assert good.original_path == "DCIM/good.mp4"
        alarm = wait_for(lambda: [a for a in agent.catalog.active_alarms() if a["kind"] == "volume_refused_entries"],
                         what="refused-entries alarm")[0]
        assert "9 entr(ies)" in alarm["message"] and "left untouched" in alarm["message"]
        (slot,) = agent.docks.slots()
        refused = "\n".join(slot.refused)
        for name, reason in [("absolute.mp4", "symbolic link"), ("relative.mp4", "symbolic link"),
                             ("inside.mp4", "symbolic link"), ("escape", "symbolic link"),
                             ("fifo.mp4", "not a regular file"), ("null.mp4", "not a regular file"),
                             ("ctl", "control character"), ("new", "control character"),
                             ("latin1-", "not valid UTF-8")]:
            assert any(name in line and reason in line for line in slot.refused), (name, refused)
        assert len(agent.catalog.files()) == 1                                   # nothing else catalogued
        assert len([p for p in agent.layout.media.rglob("*") if p.is_file()]) == 1
    assert (sha256_of(secret), secret.stat().st_mtime_ns) == before            # nothing outside touched
    assert (root / "HOSTILE/DCIM/absolute.mp4").is_symlink() and (root / "HOSTILE/DCIM/fifo.mp4").exists()


def test_zero_byte_file_is_ingested_and_reported_as_a_fault(tmp_path: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    volume = make_recorder_volume(tmp_path / "parked", "DHA1B2C3D4", {
        "320105001-20261122101500-DHA1B2C3D4.mp4": b"", "320105001-20261122102000-DHA1B2C3D4.mp4": 2_000})
    with running_agent(cfg) as agent:
        os.rename(volume, root / "DHA1B2C3D4")
        sealed = wait_states(agent.catalog, 2)
        empty = next(r for r in sealed if r.source_size == 0)
        assert (empty.size, empty.sha256) == (0, hashlib.sha256(b"").hexdigest())
        (fault,) = events(agent.catalog, "zero_byte_file")
        assert fault["type"] == "fault" and fault["file_id"] == empty.file_id and "empty (0 bytes)" in fault["message"]


@pytest.fixture
def unreadable_file(tmp_path: Path) -> Iterator[Path]:
    """A regular file that even root cannot read (`tests.helpers.unreadable`)."""
    path = make_recorder_volume(tmp_path / "dock-sim", "DHA1B2C3D4",
                                {"320105001-20261122101500-DHA1B2C3D4.mp4": b"placeholder",
                                 "320105001-20261122102000-DHA1B2C3D4.mp4": b"readable"})
    with unreadable(path / "320105001-20261122101500-DHA1B2C3D4.mp4"):
        yield path


def test_unreadable_file_raises_an_alarm_and_is_kept_for_retry(tmp_path: Path, unreadable_file: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    assert unreadable_file.parent == root                                      # docked when the agent starts
    with running_agent(cfg) as agent:
        alarm = wait_for(lambda: [a for a in agent.catalog.active_alarms() if a["kind"] == "file_unreadable"],
                         what="unreadable alarm")[0]
        assert "cannot read" in alarm["message"] and "kept on the recorder" in alarm["message"]
        wait_states(agent.catalog, 1)
        (kept,) = agent.catalog.files(states=[State.DISCOVERED])
        assert kept.original_path.endswith("101500-DHA1B2C3D4.mp4") and "Permission denied" in kept.last_error
        wait_for(lambda: agent.catalog.get(kept.file_id).attempts >= 2, what="retried")
        assert list(agent.layout.staging.iterdir()) == []
        (session,) = wait_for(lambda: agent.catalog.query("SELECT * FROM sessions WHERE manifest_sha256 IS NOT NULL"),
                              what="session manifest signed despite the unreadable file")
        doc = read_document(agent.layout.session_manifest_path(session["session_id"]))
        assert [f["original_path"] for f in doc["files"]] == ["320105001-20261122102000-DHA1B2C3D4.mp4"]
        assert doc["files_not_sealed"] == [kept.original_path]


@pytest.fixture
def failing_file(tmp_path: Path) -> Iterator[Path]:
    """A file whose reads fail with EIO while its volume stays present, as a bad sector's would.

    /proc/<pid>/mem of a live process opens fine (for root) and fails with EIO when read at offset 0;
    bind-mounted over a file on the volume it is that file.
    """
    path = make_recorder_volume(tmp_path / "dock-sim", "DHA1B2C3D4",
                                {"320105001-20261122101500-DHA1B2C3D4.mp4": b"placeholder",
                                 "320105001-20261122102000-DHA1B2C3D4.mp4": b"readable"})
    target = path / "320105001-20261122101500-DHA1B2C3D4.mp4"
    holder = subprocess.Popen(["sleep", "600"])
    subprocess.run(["mount", "--bind", f"/proc/{holder.pid}/mem", str(target)], check=True)
    try:
        fd = os.open(target, os.O_RDONLY)
        with pytest.raises(OSError, match="Input/output error"):
            os.read(fd, 4096)
        os.close(fd)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)
        holder.kill()
        holder.wait()


def test_read_error_on_a_docked_recorder_is_an_alarm_not_a_silent_retry(tmp_path: Path, failing_file: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    with running_agent(cfg) as agent:
        alarm = wait_for(lambda: [a for a in agent.catalog.active_alarms() if a["kind"] == "file_unreadable"],
                         what="unreadable alarm")[0]
        assert "Input/output error" in alarm["message"] and "stayed docked" in alarm["message"]
        (kept,) = agent.catalog.files(states=[State.DISCOVERED])
        assert kept.original_path.endswith("101500-DHA1B2C3D4.mp4") and kept.attempts >= 1
        (session,) = wait_for(lambda: agent.catalog.query("SELECT * FROM sessions WHERE manifest_sha256 IS NOT NULL"),
                              what="session manifest signed")
        doc = read_document(agent.layout.session_manifest_path(session["session_id"]))
        assert doc["files_not_sealed"] == [kept.original_path] and len(doc["files"]) == 1
        assert list(agent.layout.staging.iterdir()) == []


@pytest.fixture
def tiny_data_dir(tmp_path: Path) -> Iterator[Path]:
    """data_dir on an 8 MiB tmpfs, so the disk really fills."""
    data = tmp_path / "data"
    data.mkdir(mode=0o750)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0750", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


def test_full_disk_pauses_intake_with_an_alarm_deletes_nothing_and_resumes(tmp_path: Path,
                                                                           tiny_data_dir: Path) -> None:
    cfg, root = directory_dock(tmp_path)
    files = {f"320105001-20261122{h:02d}0000-DHA1B2C3D4.mp4": size
             for h, size in ((8, 1 << 20), (9, 1 << 20), (10, 12 << 20), (11, 1 << 20))}
    volume = make_recorder_volume(tmp_path / "parked", "DHA1B2C3D4", files)
    sources = {name: sha256_of(volume / name) for name in files}
    with running_agent(cfg) as agent:
        os.rename(volume, root / "DHA1B2C3D4")
        alarm = wait_for(lambda: [a for a in agent.catalog.active_alarms() if a["kind"] == "disk_full"],
                         what="disk_full alarm")[0]
        assert "intake paused" in alarm["message"]
        (slot,) = agent.docks.slots()
        assert slot.state == "paused"
        sealed_before = {r.file_id: sha256_of(agent.layout.data_dir / r.store_path)
                         for r in agent.catalog.files(states=[State.SEALED])}
        assert len(sealed_before) < len(files)
        assert {n: sha256_of(root / "DHA1B2C3D4" / n) for n in files} == sources     # recorder untouched
        subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_data_dir)], check=True)  # space returns
        sealed = wait_states(agent.catalog, len(files), timeout=60)
        wait_for(lambda: not [a for a in agent.catalog.active_alarms() if a["kind"] == "disk_full"],
                 what="disk_full alarm cleared")
        for record in sealed:
            assert record.sha256 == sources[record.original_path]
            if record.file_id in sealed_before:                                   # nothing stored was touched
                assert sha256_of(agent.layout.data_dir / record.store_path) == sealed_before[record.file_id]
        assert list(agent.layout.staging.iterdir()) == []
