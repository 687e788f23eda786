"""The custodian's CLI: import, files list/show, keys show, audit show, each with --json for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.catalog.audit import os_user
from edge_agent.cli import app
from edge_agent.evidence.manifest import load_public_key, read_document, verify_signature
from tests.evidence_support import sha256_of
from tests.helpers import agent_config, make_recorder_volume

runner = CliRunner()
CARD = {"DCIM/100/MOV_0001.MP4": 64_000, "DCIM/100/MOV_0002.MP4": 1_000, "AUDIO/REC_0003.WAV": 8_000}


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, Path, dict]:
    config_path, _ = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path, "SDCARD", CARD)
    result = runner.invoke(app, ["--config", str(config_path), "--json", "import", str(card), "--device", "ZFY0777",
                                 "--officer", "320102456", "--reason", "card handed in by squad 3"])
    assert result.exit_code == 0, result.output
    return config_path, card, json.loads(result.stdout)


def cli_json(config_path: Path, *args: str) -> object:
    result = runner.invoke(app, ["--config", str(config_path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_import_seals_a_card_with_the_given_device_and_officer(imported: tuple[Path, Path, dict]) -> None:
    config_path, card, summary = imported
    assert (summary["files"], summary["sealed"], summary["device_id"]) == (3, 3, "ZFY0777")
    assert summary["bytes"] == sum(CARD.values()) and summary["error"] is None
    files = cli_json(config_path, "files", "list")["files"]
    assert sorted(f["original_path"] for f in files) == sorted(CARD)
    data_dir = config_path.parent / "data"
    for row in files:
        assert (row["state"], row["device_id"], row["officer_id"], row["dock"]) == (
            "sealed", "ZFY0777", "320102456", "import")
        assert row["sha256"] == sha256_of(card / row["original_path"]) == sha256_of(data_dir / row["store_path"])
    session = read_document(data_dir / "sessions" / f"{summary['session_id']}.json")
    assert sorted(f["file_id"] for f in session["files"]) == sorted(f["file_id"] for f in files)
    started = [e for e in cli_json(config_path, "audit", "show") if e["action"] == "import.started"]
    assert started[0]["reason"] == "card handed in by squad 3" and started[0]["actor"] == os_user()


def test_files_list_filters_by_state_and_device(imported: tuple[Path, Path, dict]) -> None:
    config_path, _, _ = imported
    assert len(cli_json(config_path, "files", "list", "--state", "sealed", "--device", "ZFY0777")["files"]) == 3
    assert cli_json(config_path, "files", "list", "--state", "synced")["files"] == []
    assert cli_json(config_path, "files", "list", "--device", "OTHER")["files"] == []
    assert len(cli_json(config_path, "files", "list", "-n", "2")["files"]) == 2
    human = runner.invoke(app, ["--config", str(config_path), "files", "list"])
    assert human.exit_code == 0 and "ZFY0777" in human.stdout and "sealed" in human.stdout


def test_files_show_gives_row_manifest_history_and_is_audited(imported: tuple[Path, Path, dict]) -> None:
    config_path, _, _ = imported
    file_id = cli_json(config_path, "files", "list")["files"][0]["file_id"]
    shown = cli_json(config_path, "files", "show", file_id, "--reason", "complaint 2026-118")
    assert shown["file"]["file_id"] == file_id and shown["manifest"]["file_id"] == file_id
    assert shown["manifest"]["sha256"] == shown["file"]["sha256"]
    assert [h["action"] for h in shown["history"]] == ["file.discovered", "file.staged", "file.sealed", "files.show"]
    (access,) = [e for e in cli_json(config_path, "audit", "show", "--subject", file_id)
                 if e["action"] == "files.show"]
    assert (access["reason"], access["actor"]) == ("complaint 2026-118", os_user())
    missing = runner.invoke(app, ["--config", str(config_path), "files", "show", "01NOPE"])
    assert missing.exit_code == 1 and "no file with id '01NOPE'" in missing.output


def test_keys_show_gives_the_key_that_signed_the_manifests(imported: tuple[Path, Path, dict]) -> None:
    config_path, _, _ = imported
    keys = cli_json(config_path, "keys", "show")
    assert keys["agent_id"] == "ws-test-01" and keys["key_id"].startswith("ed25519:")
    public = load_public_key(keys["public_key_pem"])
    assert load_public_key(keys["public_key_b64"]).public_bytes_raw() == public.public_bytes_raw()
    file_id = cli_json(config_path, "files", "list")["files"][0]["file_id"]
    manifest = cli_json(config_path, "files", "show", file_id)["manifest"]
    assert manifest["key_id"] == keys["key_id"]
    verify_signature(manifest, public)
    key_file = config_path.parent / "data/keys/agent_ed25519.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600


def test_audit_show_lists_newest_first_and_human_output_is_a_table(imported: tuple[Path, Path, dict]) -> None:
    config_path, _, _ = imported
    entries = cli_json(config_path, "audit", "show", "-n", "5")
    assert len(entries) == 5 and [e["seq"] for e in entries] == sorted((e["seq"] for e in entries), reverse=True)
    human = runner.invoke(app, ["--config", str(config_path), "audit", "show"])
    assert human.exit_code == 0 and "Audit log" in human.stdout and "file.sealed" in human.stdout


def test_import_refuses_a_path_that_is_not_a_folder(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    (tmp_path / "file.mp4").write_bytes(b"x")
    result = runner.invoke(app, ["--config", str(config_path), "import", str(tmp_path / "file.mp4"),
                                 "--device", "D1"])
    assert result.exit_code == 1 and "is not a folder" in result.output
    assert not (tmp_path / "data" / "catalog.sqlite").exists()


def test_a_command_run_in_process_leaves_the_root_logger_writing_to_an_open_stream(tmp_path: Path) -> None:
    """The CLI configures logging for its process; run in-process (CliRunner swaps sys.stderr and closes its own
    after the command), its handler must not keep that closed stream, or every later log line of the process
    ends in "Logging error: I/O operation on closed file"."""
    import logging

    config_path, _ = agent_config(tmp_path)
    result = CliRunner().invoke(app, ["--config", str(config_path), "config", "check"])
    assert result.exit_code == 0, result.output
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    assert handlers and all(not h.stream.closed for h in handlers)
