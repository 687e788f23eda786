"""kill -9 of the real daemon mid-copy, and a recorder volume pulled mid-copy: nothing lost, nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_agent.catalog import Catalog, State
from edge_agent.evidence.verify import verify_all
from edge_agent.layout import StoreLayout
from tests.evidence_support import (
    growing_partial,
    large_file,
    offline_agent_config,
    running_agent,
    sha256_of,
    wait_states,
)
from tests.helpers import make_recorder_volume, wait_for

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
SMALL = {f"DCIM/100/A123456_320102123_2026112208{m:02d}00.MP4": 50_000 + m for m in range(6)}
BIG = "DCIM/100/A123456_320102123_20261122090000.MP4"


@contextmanager
def daemon(config_path: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([EDGE_AGENT, "--config", str(config_path), "run"], stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def sealed_count(catalog_path: Path) -> int:
    if not catalog_path.exists():
        return 0
    catalog = Catalog(catalog_path, readonly=True)
    try:
        return len(catalog.files(states=[State.SEALED]))
    finally:
        catalog.close()


def test_kill_9_during_a_copy_then_restart_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "dock-sim"
    config_path, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root)}])
    volume = make_recorder_volume(root, "A123456", SMALL,
                                  identity={"DeviceID": "A123456", "PoliceID": "320102123"})
    large_file(volume / BIG, 1 << 30)
    layout = StoreLayout(cfg.agent.data_dir)
    log = tmp_path / "daemon.log"
    with daemon(config_path, log) as first:
        part = growing_partial(layout.staging)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    assert part.exists()                      # the crash left a partial copy behind
    with daemon(config_path, log) as second:
        wait_for(lambda: sealed_count(cfg.catalog_path) == len(SMALL) + 1 or second.poll() is not None,
                 timeout=120, what="every file sealed after restart")
        assert second.poll() is None, log.read_text()[-3000:]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, log.read_text()[-3000:]

    catalog = Catalog(cfg.catalog_path)
    rows = catalog.files()
    assert sorted(r.original_path for r in rows) == sorted([*SMALL, BIG])            # one row per source
    assert all(r.state == State.SEALED for r in rows)
    stored = sorted(p for p in layout.media.rglob("*") if p.is_file())
    assert stored == sorted(layout.data_dir / r.store_path for r in rows)              # one store file each
    assert list(layout.staging.glob("*.part")) == []
    for record in rows:
        assert record.sha256 == sha256_of(volume / record.original_path)
    assert verify_all(catalog, layout) == []    # chain + audit intact
    started = catalog.query("SELECT detail FROM audit WHERE action = 'agent.started' ORDER BY seq")
    # The big file's partial at least; the small files of its batch too when the kill came before their sync.
    assert len(started) == 2 and json.loads(started[1]["detail"])["partials_removed"] >= 1
    catalog.close()


def test_volume_pulled_mid_copy_discards_the_partial_and_resumes_when_back(tmp_path: Path) -> None:
    root = tmp_path / "dock-sim"
    _, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root)}])
    with running_agent(cfg) as agent:
        parked = tmp_path / "pulled"
        volume = make_recorder_volume(parked, "A123456", {}, identity={"DeviceID": "A123456"})
        large_file(volume / BIG, 1 << 30)
        os.rename(volume, root / "A123456")                            # docked
        growing_partial(agent.layout.staging)
        os.rename(root / "A123456", volume)                            # pulled out mid-copy
        wait_for(lambda: agent.catalog.query("SELECT 1 FROM sessions WHERE state = 'undocked'"), what="undock")
        wait_for(lambda: not list(agent.layout.staging.glob("*.part")), what="partial discarded")
        (record,) = agent.catalog.files()
        assert record.state == State.DISCOVERED and record.sha256 is None
        assert not [p for p in agent.layout.media.rglob("*") if p.is_file()]
        os.rename(volume, root / "A123456")                            # back in the dock
        (sealed,) = wait_states(agent.catalog, 1, timeout=120)
        assert sealed.file_id == record.file_id and sealed.sha256 == sha256_of(root / "A123456" / BIG)
        assert sha256_of(agent.layout.data_dir / sealed.store_path) == sealed.sha256
