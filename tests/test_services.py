"""The service layer the CLI (and the status page) calls: results are data, refusals are `ServiceError`."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_agent import services
from edge_agent.catalog import Catalog, State
from edge_agent.config import AgentConfig
from edge_agent.ops.alarms import TAMPER
from edge_agent.services.workspace import Result
from tests.helpers import agent_config


def discovered(catalog: Catalog, name: str, size: int = 1000) -> str:
    record, _ = catalog.discover(kind="recorder", device_id="ZFY0001", original_path=name, source_path=None,
                                 source_size=size, source_mtime_ns=1)
    return record.file_id


@pytest.fixture
def config(tmp_path: Path) -> AgentConfig:
    return agent_config(tmp_path)[1]


def test_a_workspace_opens_the_catalog_only_when_a_service_needs_it_and_names_a_missing_one(
        config: AgentConfig) -> None:
    with services.Workspace(config) as ws:
        key = services.keys.show(ws)
        assert key.agent_id == config.agent.id and key.key_id.startswith("ed25519:")
        assert "catalog" not in vars(ws) and not config.catalog_path.exists()
        with pytest.raises(services.NoCatalog, match="no catalog at .*edge-agent run"):
            services.status.status(ws)


def test_status_counts_rejected_files_as_unsynced_but_the_sync_queue_holds_only_sealed_ones(
        config: AgentConfig) -> None:
    catalog = Catalog(config.catalog_path)
    waiting, rejected, sealed = (discovered(catalog, f"F{i}.MP4") for i in range(3))
    catalog.transition(rejected, State.REJECTED)
    catalog.transition(sealed, State.STAGED, size=1000)
    catalog.transition(sealed, State.SEALED)
    with services.Workspace(config) as ws:
        report = services.status.status(ws)
        assert (report.unsynced.files, report.unsynced.bytes) == (3, 3000)
        assert report.files_by_state == {"discovered": 1, "rejected": 1, "sealed": 1}
        assert list(report.as_dict()) == ["files_by_state", "unsynced", "alarms", "last_sync_ms", "daemon", "chain"]
        assert report.daemon is None   # no daemon wrote a health snapshot
        done = services.sync.sync_now(ws)
        assert done.as_dict() == {"retried": [], "waiting_files": 1, "waiting_bytes": 1000, "rejected": 1}
    assert catalog.get(waiting).state == State.DISCOVERED


def test_sync_now_sends_a_file_rejected_before_sealing_back_to_be_copied_again(config: AgentConfig) -> None:
    catalog = Catalog(config.catalog_path)
    file_id = discovered(catalog, "BAD.MP4")
    catalog.transition(file_id, State.REJECTED, last_error="unreadable")
    with services.Workspace(config) as ws:
        done = services.sync.sync_now(ws, retry_rejected=True, reason="card cleaned")
    assert (done.retried, done.rejected) == ((file_id,), 0)
    assert catalog.get(file_id).state == State.DISCOVERED
    assert catalog.meta_get(services.sync.SYNC_NOW_META) is not None


def test_verify_of_an_edited_audit_log_raises_the_tamper_alarm_of_ops_alarms(config: AgentConfig) -> None:
    catalog = Catalog(config.catalog_path)
    catalog.audit("files.show", subject="x", reason="first")
    with sqlite3.connect(config.catalog_path) as conn:
        conn.execute("UPDATE audit SET reason = 'edited' WHERE seq = 1")
    with services.Workspace(config) as ws:
        report = services.verify.verify(ws, reason="weekly check")
        assert not report.ok and report.as_dict()["ok"] is False
        assert any(f.what == "audit" for f in report.findings)
        assert not services.audit.check_chain(ws).ok
        (alarm,) = services.alarms.active(ws)
    assert (alarm.kind, alarm.subject) == (TAMPER, "verify")


def test_refusals_are_service_errors_that_say_what_to_do(config: AgentConfig) -> None:
    Catalog(config.catalog_path)
    with services.Workspace(config) as ws:
        with pytest.raises(services.ServiceError, match="no file with id '01NOPE'"):
            services.files.show(ws, "01NOPE")
        with pytest.raises(services.ServiceError, match="--reason"):
            services.keys.rotate(ws, reason=None)
        with pytest.raises(services.ServiceError, match="not checked out"):
            services.custody.return_device(ws, "ZFY0001")
        with pytest.raises(services.ServiceError, match="no camera 'gate' in the config"):
            services.cameras.camera(ws, "gate")


def test_a_result_is_json_ready_data_in_field_order() -> None:
    @dataclass(frozen=True)
    class Inner(Result):
        path: Path

    @dataclass(frozen=True)
    class Outer(Result):
        name: str
        items: tuple[Inner, ...]

    assert Outer("a", (Inner(Path("/x")),)).as_dict() == {"name": "a", "items": [{"path": "/x"}]}
