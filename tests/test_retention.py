"""Retention and holds (R6): nothing unsynced or held is ever purged; purge keeps the row and manifest."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from typer.testing import CliRunner

from edge_agent.catalog import State
from edge_agent.cli import app
from edge_agent.clock import now_ms
from edge_agent.daemon import Agent
from edge_agent.evidence.verify import verify_all
from edge_agent.ingest import IntakePaused
from edge_agent.ops import retention as retention_module
from edge_agent.ops.custody import tag
from edge_agent.ops.retention import DAY_MS, Retention, place_hold, release_hold
from tests.helpers import agent_config
from tests.opsdata import confirm, ingest_file

KIB = 1024


def _agent(tmp_path: Path, **sections: object) -> tuple[Path, Agent]:
    path, cfg = agent_config(tmp_path, **sections)
    return path, Agent(cfg, dock_drivers=[])


def test_routine_file_is_purged_after_its_days_and_keeps_row_and_manifest(tmp_path: Path) -> None:
    _, agent = _agent(tmp_path)
    now = now_ms()
    old = confirm(agent, ingest_file(agent, tmp_path / "src", "old.MP4").file_id, synced_ms=now - 181 * DAY_MS)
    young = confirm(agent, ingest_file(agent, tmp_path / "src", "young.MP4").file_id, synced_ms=now - 179 * DAY_MS)
    manifest_before = agent.layout.manifest_path(old.file_id).read_bytes()

    report = Retention(agent.catalog, agent.layout, agent.config).run(now)

    assert report.aged == [old.file_id]
    purged = agent.catalog.get(old.file_id)
    assert purged.state == State.PURGED and purged.purged_ms is not None
    assert not (agent.layout.data_dir / str(old.store_path)).exists()
    assert agent.layout.manifest_path(old.file_id).read_bytes() == manifest_before
    assert (agent.layout.data_dir / str(young.store_path)).exists()
    assert agent.catalog.get(young.file_id).state == State.SYNCED
    entry = agent.catalog.query("SELECT * FROM audit WHERE subject = ? AND action = 'file.purged'", (old.file_id,))
    assert "180 days" in entry[0]["reason"]
    assert verify_all(agent.catalog, agent.layout) == []


def test_disk_pressure_purges_oldest_confirmed_first_and_nothing_else(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The pressure here is the store's against max_disk_gb; the real filesystem's use (the worse of the two
    # counts) is whatever else fills this machine's disk, and above 55 % it would purge a third file.
    monkeypatch.setattr(retention_module, "filesystem_percent", lambda _layout: 0.0)
    size = 100 * KIB
    # Eight files' worth of room, six stored: 75 % of the store's limit; the purge limit is 55 %.
    _, agent = _agent(tmp_path, agent={"max_disk_gb": 8 * size / 1024**3},
                      retention={"disk_purge_percent": 55})
    now = now_ms()
    src = tmp_path / "src"
    held = confirm(agent, ingest_file(agent, src, "held.MP4", size).file_id, synced_ms=now - 30 * DAY_MS)
    evidence = confirm(agent, ingest_file(agent, src, "evidence.MP4", size).file_id, synced_ms=now - 20 * DAY_MS)
    first = confirm(agent, ingest_file(agent, src, "first.MP4", size).file_id, synced_ms=now - 10 * DAY_MS)
    second = confirm(agent, ingest_file(agent, src, "second.MP4", size).file_id, synced_ms=now - 5 * DAY_MS)
    third = confirm(agent, ingest_file(agent, src, "third.MP4", size).file_id, synced_ms=now - 1 * DAY_MS)
    unsynced = ingest_file(agent, src, "unsynced.MP4", size)
    place_hold(agent.catalog, file_id=held.file_id, reason="complaint", actor="test")
    tag(agent.catalog, agent.sealer, agent.layout, evidence.file_id, case_id="2026-001", actor="test")
    retention = Retention(agent.catalog, agent.layout, agent.config)
    assert retention.disk_percent() >= 75

    report = retention.run(now)

    assert report.aged == []
    assert report.pressure == [first.file_id, second.file_id]
    assert report.disk_percent_after < 55
    states = {r.file_id: r.state for r in agent.catalog.files()}
    assert states[third.file_id] == State.SYNCED
    assert states[held.file_id] == State.SYNCED
    assert states[evidence.file_id] == State.SYNCED
    assert states[unsynced.file_id] == State.SEALED


def test_release_of_a_case_returns_its_files_to_routine_retention(tmp_path: Path) -> None:
    _, agent = _agent(tmp_path)
    now = now_ms()
    record = confirm(agent, ingest_file(agent, tmp_path / "src", "a.MP4").file_id, synced_ms=now - 200 * DAY_MS)
    tag(agent.catalog, agent.sealer, agent.layout, record.file_id, case_id="C-7", actor="test")
    place_hold(agent.catalog, case_id="C-7", reason="court", actor="test")
    retention = Retention(agent.catalog, agent.layout, agent.config)
    assert retention.run(now).purged == []

    release_hold(agent.catalog, case_id="C-7", reason="case closed", actor="test")

    assert agent.catalog.get(record.file_id).retention == "routine"
    assert retention.run(now).aged == [record.file_id]


def test_hold_and_release_from_the_command_line_are_audited_with_reason(tmp_path: Path) -> None:
    cfg_path, agent = _agent(tmp_path)
    record = ingest_file(agent, tmp_path / "src", "a.MP4")
    runner = CliRunner()
    base = ["--config", str(cfg_path), "--json"]

    held = runner.invoke(app, [*base, "hold", record.file_id, "--reason", "complaint 2026-17"])
    assert held.exit_code == 0, held.output
    assert agent.catalog.is_held(record.file_id)
    no_reason = runner.invoke(app, [*base, "hold", "--case", "X"])
    assert no_reason.exit_code == 1 and "--reason" in no_reason.output
    released = runner.invoke(app, [*base, "release", record.file_id, "--reason", "complaint withdrawn"])
    assert released.exit_code == 0, released.output
    assert not agent.catalog.is_held(record.file_id)

    actions = agent.catalog.query("SELECT action, reason, actor FROM audit WHERE subject = ? AND action LIKE 'hold.%'"
                                  " ORDER BY seq", (record.file_id,))
    assert [(a["action"], a["reason"]) for a in actions] == [("hold.placed", "complaint 2026-17"),
                                                             ("hold.released", "complaint withdrawn")]
    assert all(a["actor"] for a in actions)


class RetentionHistories(RuleBasedStateMachine):
    """Random histories of ingest, sync, tags, holds, releases, time and disk pressure: retention never purges a
    file that is unsynced, held, or of the evidence or long-term class."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="retention-"))
        self.now = now_ms()
        self.files: list[str] = []
        self.cases = ["C-1", "C-2"]

    @initialize(max_files=st.integers(min_value=4, max_value=12))
    def start(self, max_files: int) -> None:
        _, cfg = agent_config(self.tmp, agent={"max_disk_gb": max_files * 2 * KIB / 1024**3, "verify_readback": False})
        self.agent = Agent(cfg, dock_drivers=[])

    def teardown(self) -> None:
        self.agent.catalog.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(size=st.integers(min_value=0, max_value=2 * KIB))
    def ingest(self, size: int) -> None:
        try:
            record = ingest_file(self.agent, self.tmp / "src", f"f{len(self.files)}.bin", size)
        except IntakePaused:
            return  # a full store pauses intake: allowed, and it changes nothing
        self.files.append(record.file_id)

    @precondition(lambda self: self.files)
    @rule(index=st.integers(min_value=0), days_ago=st.integers(min_value=0, max_value=400))
    def sync(self, index: int, days_ago: int) -> None:
        file_id = self.files[index % len(self.files)]
        if self.agent.catalog.get(file_id).state == State.SEALED:
            confirm(self.agent, file_id, synced_ms=self.now - days_ago * DAY_MS)

    @precondition(lambda self: self.files)
    @rule(index=st.integers(min_value=0), by_case=st.booleans())
    def hold(self, index: int, by_case: bool) -> None:
        file_id = self.files[index % len(self.files)]
        if by_case:
            place_hold(self.agent.catalog, case_id=self.cases[index % 2], reason="test", actor="test")
        else:
            place_hold(self.agent.catalog, file_id=file_id, reason="test", actor="test")

    @precondition(lambda self: self.files)
    @rule(index=st.integers(min_value=0), by_case=st.booleans())
    def release(self, index: int, by_case: bool) -> None:
        file_id = self.files[index % len(self.files)]
        try:
            if by_case:
                release_hold(self.agent.catalog, case_id=self.cases[index % 2], reason="test", actor="test")
            else:
                release_hold(self.agent.catalog, file_id=file_id, reason="test", actor="test")
        except ValueError:
            pass  # nothing held: refused, nothing changed

    @precondition(lambda self: self.files)
    @rule(index=st.integers(min_value=0), retention=st.sampled_from(["routine", "evidence", "long_term"]))
    def tag(self, index: int, retention: str) -> None:
        file_id = self.files[index % len(self.files)]
        tag(self.agent.catalog, self.agent.sealer, self.agent.layout, file_id, case_id=self.cases[index % 2],
            retention=retention, actor="test")

    @rule(days=st.integers(min_value=0, max_value=200))
    def time_passes(self, days: int) -> None:
        self.now += days * DAY_MS

    @rule(limit=st.sampled_from([1.0, 50.0, 85.0, 100.0]))
    def run_retention(self, limit: float) -> None:
        catalog = self.agent.catalog
        keep = {r.file_id for r in catalog.files()
                if r.state not in ("synced", "source_cleared") or catalog.is_held(r.file_id)
                or r.retention != "routine"}
        before = {r.file_id: r for r in catalog.files()}
        config = self.agent.config.model_copy(
            update={"retention": self.agent.config.retention.model_copy(update={"disk_purge_percent": limit})})
        report = Retention(catalog, self.agent.layout, config).run(self.now)
        assert not keep & set(report.purged), "purged a file that was unsynced, held or not routine"
        for file_id in report.aged:
            assert before[file_id].synced_ms <= self.now - 180 * DAY_MS
        for file_id in report.purged:
            assert catalog.get(file_id).state == State.PURGED

    @invariant()
    def purged_files_were_confirmed_and_keep_their_manifest(self) -> None:
        if not hasattr(self, "agent"):
            return
        for record in self.agent.catalog.files(states=[State.PURGED]):
            assert record.synced_ms is not None
            assert self.agent.layout.manifest_path(record.file_id).exists()
            assert not (self.agent.layout.data_dir / str(record.store_path)).exists()


RetentionHistories.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None,
                                                suppress_health_check=[HealthCheck.too_slow])
test_retention_never_purges_unsynced_or_held_files = RetentionHistories.TestCase
