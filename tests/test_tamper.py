"""G4: one changed byte in a stored file, a manifest, a session manifest or the audit log is reported."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.cli import app
from tests.helpers import agent_config, make_recorder_volume

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with three imported, sealed files (built once, copied per test)."""
    base = tmp_path_factory.mktemp("pristine")
    config_path, _ = agent_config(base)
    card = make_recorder_volume(base, "card", {"v1.mp4": 120_000, "v2.mp4": 80_000, "sub/v3.wav": 9_000})
    result = runner.invoke(app, ["--config", str(config_path), "import", str(card), "--device", "ZFY0001",
                                 "--officer", "320102123", "--reason", "test fixture"])
    assert result.exit_code == 0, result.output
    return base / "data"


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    config_path, _ = agent_config(tmp_path)
    shutil.copytree(pristine, tmp_path / "data", symlinks=True)
    return config_path, tmp_path / "data"


def cli(config_path: Path, *args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["--config", str(config_path), "--json", *args])
    return result.exit_code, json.loads(result.stdout)


def flip_byte(path: Path, offset: int) -> None:
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def rows(data: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(data / "catalog.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def edit_catalog(data: Path, sql: str) -> None:
    """What someone with write access to the database file could do behind the agent's back."""
    conn = sqlite3.connect(data / "catalog.sqlite")
    with conn:
        conn.execute(sql)
    conn.close()


def test_untouched_store_verifies(store: tuple[Path, Path]) -> None:
    config_path, _ = store
    code, report = cli(config_path, "verify", "--all")
    assert (code, report["ok"], report["checked_files"]) == (0, True, 3)
    assert cli(config_path, "audit", "verify")[0] == 0


def test_flipped_byte_in_a_stored_file_is_named_by_verify(store: tuple[Path, Path]) -> None:
    config_path, data = store
    victim = rows(data, "SELECT file_id, store_path FROM files WHERE original_path = 'v2.mp4'")[0]
    flip_byte(data / victim["store_path"], 40_000)
    code, report = cli(config_path, "verify", "--all")
    assert code == 1 and not report["ok"]
    assert [(f["subject"], f["what"]) for f in report["findings"]] == [(victim["file_id"], "media")]
    code, single = cli(config_path, "verify", victim["file_id"])
    assert code == 1 and single["findings"][0]["subject"] == victim["file_id"]


def test_flipped_byte_in_a_manifest_is_named_by_verify(store: tuple[Path, Path]) -> None:
    config_path, data = store
    victim = rows(data, "SELECT file_id FROM files ORDER BY file_id")[0]["file_id"]
    manifest = data / "manifests" / victim[-2:] / f"{victim}.json"
    text = manifest.read_bytes()
    flip_byte(manifest, text.index(b'"officer_id":"') + len(b'"officer_id":"'))   # 320102123 -> 220102123
    code, report = cli(config_path, "verify", "--all")
    assert code == 1
    assert {f["subject"] for f in report["findings"]} == {victim}
    assert {f["what"] for f in report["findings"]} == {"manifest", "chain"}


def test_flipped_byte_in_a_session_manifest_is_named_by_verify(store: tuple[Path, Path]) -> None:
    config_path, data = store
    (session,) = rows(data, "SELECT session_id FROM sessions")
    flip_byte(data / "sessions" / f"{session['session_id']}.json", 60)
    code, report = cli(config_path, "verify", "--all")
    assert code == 1
    assert [(f["subject"], f["what"]) for f in report["findings"]] == [(session["session_id"], "chain")]
    assert "altered" in report["findings"][0]["message"]


def test_edited_audit_row_is_named_by_audit_verify_and_verify(store: tuple[Path, Path]) -> None:
    config_path, data = store
    edit_catalog(data, "UPDATE audit SET actor = 'someone-else' WHERE seq = 5")
    code, report = cli(config_path, "audit", "verify")
    assert code == 1 and report["problems"] == ["audit entry 5: content does not match its hash (edited)"]
    code, full = cli(config_path, "verify", "--all")
    assert code == 1 and [f["what"] for f in full["findings"]] == ["audit"]


def test_deleted_audit_row_is_named_by_audit_verify(store: tuple[Path, Path]) -> None:
    config_path, data = store
    edit_catalog(data, "DELETE FROM audit WHERE seq = 7")
    code, report = cli(config_path, "audit", "verify")
    assert code == 1 and any(p.startswith("audit entry 8:") and "missing" in p for p in report["problems"])
