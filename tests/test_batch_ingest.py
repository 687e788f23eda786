"""Small files in batches, and directories durable in their parent: a batch groups the fsyncs and the
transactions, yet no row is written before the bytes (and directory entries) it describes are durable, and a
kill -9 inside a batch loses nothing and stores nothing twice."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge_agent import durable
from edge_agent.catalog import Catalog, State
from edge_agent.catalog.files import Files
from edge_agent.durable import atomic_write, make_dirs
from edge_agent.evidence.manifest import AgentKey
from edge_agent.evidence.verify import verify_all
from edge_agent.ingest import Ingestor, Sealer
from edge_agent.layout import StoreLayout
from tests.evidence_support import offline_agent_config, sha256_of
from tests.helpers import agent_config, make_recorder_volume, resident_pages, wait_for
from tests.test_crash_ingest import daemon, sealed_count

DEVICE = {"DeviceID": "A123456", "PoliceID": "320102123"}


class Journal:
    """What reached the kernel, in order: mkdir, fsync (of which path), syncfs, rename, and catalog rows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.events: list[tuple[str, str]] = []
        real_fsync, real_mkdir, real_replace = os.fsync, os.mkdir, os.replace
        real_libc = durable._libc

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def mkdir(path: Any, mode: int = 0o777, **kw: Any) -> None:
            real_mkdir(path, mode, **kw)
            self.events.append(("mkdir", os.path.abspath(path)))

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            real_replace(src, dst, **kw)
            self.events.append(("rename", os.path.abspath(dst)))

        class Libc:
            def sync_file_range(self, *args: Any) -> int:
                return real_libc.sync_file_range(*args)

            def syncfs(_self, fd: int) -> int:  # noqa: N805 - a stand-in for the C library
                self.events.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))
                return real_libc.syncfs(fd)

        genuine = Files.transition

        def transition(files: Files, file_id: str, to: State, **kw: Any) -> Any:
            self.events.append(("row", f"{to}:{file_id}"))
            return genuine(files, file_id, to, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(durable, "_libc", Libc())
        monkeypatch.setattr(Files, "transition", transition)

    def index(self, event: tuple[str, str]) -> int:
        return self.events.index(event)

    def synced_after(self, path: str, at: int, before: int | None = None) -> bool:
        """Was `path` fsynced, or its filesystem syncfs'd, after event `at` (and before event `before`)?"""
        window = self.events[at + 1:before]
        return ("fsync", path) in window or any(kind == "syncfs" for kind, _ in window)


def test_every_new_directory_of_the_store_is_fsynced_in_its_parent(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(monkeypatch)
    data = tmp_path / "evidence" / "data"
    layout = StoreLayout(data)
    layout.create()
    atomic_write(layout.manifest_path("01JTESTFILE0000000000000AB"), b"{}")
    made = [path for kind, path in journal.events if kind == "mkdir"]
    assert {str(data), str(layout.staging), str(layout.media), str(layout.manifests), str(layout.sessions),
            str(layout.manifests / "AB")} <= set(made)
    for path in made:
        at = journal.index(("mkdir", path))
        assert ("fsync", os.path.dirname(path)) in journal.events[at + 1:], f"{path} never fsynced in its parent"


def test_make_dirs_fsyncs_the_parent_of_a_directory_another_thread_made(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory found (made by someone not known to have synced it) still gets its parent fsynced."""
    (tmp_path / "made-elsewhere").mkdir()
    journal = Journal(monkeypatch)
    assert make_dirs(tmp_path / "made-elsewhere") == []
    assert ("fsync", str(tmp_path)) in journal.events


def _ingestor(tmp_path: Path) -> tuple[Ingestor, Catalog, StoreLayout]:
    _, config = agent_config(tmp_path)
    layout = StoreLayout(config.agent.data_dir).open()
    catalog = Catalog(config.catalog_path)
    sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, config)
    return Ingestor(catalog, layout, sealer, config), catalog, layout


def _card(tmp_path: Path, count: int, size: int) -> tuple[Ingestor, Catalog, StoreLayout, Path, list[str], list[Any]]:
    """A card of `count` photos of `size` bytes, each with its discovered row."""
    names = [f"DCIM/IMG_{i:04d}.JPG" for i in range(count)]
    volume = make_recorder_volume(tmp_path / "card", "CARD", dict.fromkeys(names, size))
    ingestor, catalog, layout = _ingestor(tmp_path)
    return ingestor, catalog, layout, volume, names, _discover(catalog, volume, names)


def _discover(catalog: Catalog, volume: Path, names: list[str]) -> list[Any]:
    items = []
    for name in names:
        st = (volume / name).stat()
        record, _ = catalog.discover(kind="recorder", device_id="A123456", original_path=name,
                                     source_path=str(volume / name), source_size=st.st_size,
                                     source_mtime_ns=st.st_mtime_ns)
        items.append((record, volume / name))
    return items


def test_a_batch_is_one_staged_and_one_sealed_transaction_each_row_after_its_bytes_are_durable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor, catalog, layout, volume, names, items = _card(tmp_path, 40, 20_000)
    commits = []
    genuine = catalog.conn

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(genuine, name)

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                commits.append(sql)
            return genuine.execute(sql, *args)

    monkeypatch.setattr(catalog, "conn", Counting())
    journal = Journal(monkeypatch)
    done = ingestor.ingest_batch(items)
    assert done.failed is None and len(done.sealed) == len(names)
    assert len(commits) == 2, f"{len(commits)} commits for one batch (want: staged, sealed)"
    for record in done.sealed:
        stored = str(layout.data_dir / record.store_path)
        manifest = str(layout.manifest_path(record.file_id))
        renamed, staged = journal.index(("rename", stored)), journal.index(("row", f"staged:{record.file_id}"))
        assert journal.synced_after(os.path.dirname(stored), renamed, staged), "staged before the rename was durable"
        written, sealed = journal.index(("rename", manifest)), journal.index(("row", f"sealed:{record.file_id}"))
        assert journal.synced_after(os.path.dirname(manifest), written, sealed), "sealed before its manifest"
        assert record.sha256 == sha256_of(volume / record.original_path)
    assert verify_all(catalog, layout) == []   # chained in order
    catalog.close()


def test_a_copy_that_does_not_read_back_stops_the_batch_there_and_the_rest_is_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ingestor, catalog, layout, _, names, items = _card(tmp_path, 6, 5_000)
    from edge_agent.ingest import stage

    genuine = stage.prove_copy

    def flaky(staging: Path, digest: str, size: int, record: Any, *rest: Any) -> None:
        genuine(staging, "0" * 64 if record.original_path == names[3] else digest, size, record, *rest)

    monkeypatch.setattr(stage, "prove_copy", flaky)
    done = ingestor.ingest_batch(items)
    assert [r.original_path for r in done.sealed] == names[:3]
    assert done.failed is not None and done.failed[0].original_path == names[3]
    assert type(done.failed[2]).__name__ == "CopyMismatch"
    assert [r.original_path for r, _ in done.rest] == names[4:]
    assert list(layout.staging.iterdir()) == []              # the discarded copies are gone
    assert {r.state for r in catalog.files() if r.original_path in names[3:]} == {State.DISCOVERED}
    catalog.close()


def test_kill_9_inside_a_batch_of_small_files_loses_nothing_and_stores_nothing_twice(tmp_path: Path) -> None:
    root = tmp_path / "dock-sim"
    config_path, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root),
                                                               "settle_s": 0}])
    files = {f"DCIM/100/A123456_320102123_20261122{h:02d}{m:02d}00.MP4": 20_000 + h * 60 + m
             for h in range(8) for m in range(50)}
    volume = make_recorder_volume(root, "A123456", files, identity=DEVICE)
    layout = StoreLayout(cfg.agent.data_dir)
    log = tmp_path / "daemon.log"

    def inside_a_batch() -> bool:
        """Copies renamed into the store whose rows are not sealed yet, or copies in staging."""
        try:
            stored = sum(1 for p in layout.media.rglob("*") if p.is_file())
            return any(layout.staging.glob("*.part")) or stored > sealed_count(cfg.catalog_path)
        except (OSError, sqlite3.Error):   # the catalog or store not made yet
            return False

    hits = 0
    for _ in range(3):
        with daemon(config_path, log) as proc:
            try:
                wait_for(lambda: inside_a_batch() and sealed_count(cfg.catalog_path) < len(files),
                         timeout=60, interval=0.002, what="a batch in flight")
                hits += 1
            except TimeoutError:
                pass
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
    assert hits, "no kill landed inside a batch"
    with daemon(config_path, log) as last:
        wait_for(lambda: sealed_count(cfg.catalog_path) == len(files) or last.poll() is not None,
                 timeout=180, what="every file sealed after the kills")
        assert last.poll() is None, log.read_text()[-3000:]
        last.send_signal(signal.SIGTERM)
        assert last.wait(timeout=60) == 0, log.read_text()[-3000:]
    catalog = Catalog(cfg.catalog_path)
    rows = {r.original_path: r for r in catalog.files()}
    assert set(rows) == set(files) and len(catalog.files()) == len(files)       # one row per source
    assert {r.state for r in rows.values()} == {State.SEALED}
    assert {p for p in layout.media.rglob("*") if p.is_file()} == {
        layout.data_dir / r.store_path for r in rows.values()}                  # one store file each, no orphan
    assert not any(layout.staging.iterdir())
    assert all(r.sha256 == sha256_of(volume / path) for path, r in rows.items())
    assert verify_all(catalog, layout) == []    # chain + audit intact
    catalog.close()



def test_an_ingest_leaves_neither_the_recorders_files_nor_their_copies_in_the_page_cache(tmp_path: Path) -> None:
    """A recorder's file is read once and its copy read back once: both are dropped from the page cache after,
    so the next file's pages reuse theirs (docs/BENCHMARKS.md "Ingest speed"); the read-back still reads the disk.
    (Small files, under `stage.DROP_SOURCE_BYTES` and `digest.DIRECT_READ_BYTES`, stay cached: dropping costs more
    than it saves there, and the probe of a photo reads its copy's head next.)"""
    from edge_agent.ingest import stage

    names = [f"DCIM/LOG_{i:04d}.bin" for i in range(3)]   # not media: nothing probes the stored copy after
    volume = make_recorder_volume(tmp_path / "card", "CARD", dict.fromkeys(names, stage.DROP_SOURCE_BYTES + 123))
    os.sync()   # dropping leaves dirty pages: the recorder's files are on its disk before they are read
    if resident_pages(volume / names[0]) == 0:
        pytest.skip("written pages are not in the page cache on this filesystem")
    fd = os.open(volume / names[1], os.O_RDONLY)
    durable.drop_cache(fd)
    os.close(fd)
    if resident_pages(volume / names[1]):
        pytest.skip("this filesystem ignores POSIX_FADV_DONTNEED")
    ingestor, catalog, layout = _ingestor(tmp_path)
    done = ingestor.ingest_batch(_discover(catalog, volume, names))
    assert done.failed is None and len(done.sealed) == len(names)
    for record in done.sealed:
        assert resident_pages(volume / record.original_path) == 0, f"{record.original_path} left cached"
        stored = layout.data_dir / record.store_path
        assert resident_pages(stored) == 0, f"copy of {record.original_path} left cached"
        assert record.sha256 == sha256_of(volume / record.original_path) == sha256_of(stored)
    catalog.close()


def test_the_read_back_reads_the_disk_even_where_o_direct_is_refused(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back opens a large copy O_DIRECT (no cached page can answer it); a filesystem that refuses
    O_DIRECT gets a plain read of the copy with its cached pages dropped before and after, and the copy is proven
    all the same."""
    from edge_agent import digest

    ingestor, catalog, layout, volume, names, items = _card(tmp_path, 2, digest.DIRECT_READ_BYTES + 7)
    opened: list[int] = []
    dropped: list[str] = []
    real_open, real_drop = os.open, digest.drop_cache

    def refusing_open(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".part") and flags & os.O_DIRECT:
            opened.append(flags)
            raise OSError(22, "Invalid argument")   # EINVAL: what open(2) says where O_DIRECT is not supported
        return real_open(path, flags, *args)

    def drop(fd: int) -> None:
        dropped.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_drop(fd)

    monkeypatch.setattr(digest.os, "open", refusing_open)
    monkeypatch.setattr(digest, "drop_cache", drop)
    done = ingestor.ingest_batch(items)
    assert done.failed is None and len(done.sealed) == 2
    assert len(opened) == 2                                   # each read-back asked for O_DIRECT first
    for record in done.sealed:
        staging = str(layout.staging_path(record.file_id, encrypted=False))
        assert dropped.count(staging) == 2, "the plain read-back drops the copy's pages before and after"
        assert record.sha256 == sha256_of(volume / record.original_path)
    catalog.close()
