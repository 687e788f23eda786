"""Key rotation: the old key signs the hand-over, earlier documents keep verifying, nothing sealed is rewritten."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.evidence.manifest import load_public_key, read_document, verify_signature
from tests.helpers import agent_config, make_recorder_volume

runner = CliRunner()


def cli(config_path: Path, *args: str) -> dict | list:
    result = runner.invoke(app, ["--config", str(config_path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rotated_key_signs_new_files_and_old_files_still_verify(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    first = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 20_000})
    cli(config_path, "import", str(first), "--device", "ZFY0001", "--officer", "320102123")
    old = cli(config_path, "keys", "show")

    rotated = cli(config_path, "keys", "rotate", "--reason", "annual rotation")
    assert rotated["old_key_id"] == old["key_id"] != rotated["key_id"]

    second = make_recorder_volume(tmp_path / "cards", "CARD2", {"DCIM/B.MP4": 20_000})
    cli(config_path, "import", str(second), "--device", "ZFY0002", "--officer", "320102123")
    data = tmp_path / "data"
    files = {f["original_path"]: f for f in cli(config_path, "files", "list")["files"]}
    signed_by = {path: read_document(data / "manifests" / f["file_id"][-2:] / f"{f['file_id']}.json")["key_id"]
                 for path, f in files.items()}
    assert signed_by == {"DCIM/A.MP4": old["key_id"], "DCIM/B.MP4": rotated["key_id"]}

    # The hand-over is signed by the old key and names the new one.
    (record_path,) = (data / "rotations").glob("*.json")
    record = read_document(record_path)
    verify_signature(record, load_public_key(old["public_key_pem"]))
    assert (record["type"], record["new_key_id"], record["reason"]) == (
        "key_rotation", rotated["key_id"], "annual rotation")
    assert cli(config_path, "verify", "--all")["ok"] is True
    assert any(e["action"] == "keys.rotated" for e in cli(config_path, "audit", "show"))


def test_a_forged_retired_key_makes_old_documents_fail_verify(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 5_000})
    cli(config_path, "import", str(card), "--device", "ZFY0001", "--officer", "320102123")
    cli(config_path, "keys", "rotate", "--reason", "suspected exposure")
    (retired,) = (tmp_path / "data" / "keys" / "retired").glob("*.pub")
    impostor = cli(config_path, "keys", "show")["public_key_pem"]  # the new key, not the one retired
    retired.write_text(impostor)  # a swapped public key must not make old signatures "verify"

    result = runner.invoke(app, ["--config", str(config_path), "verify", "--all"])
    assert result.exit_code == 1
    assert "signed by" in result.output or "signature" in result.output


def test_json_may_follow_the_command(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "--config", str(config_path), "keys", "show",
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["key_id"].startswith("ed25519:")


def test_rotation_needs_a_reason(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    cli(config_path, "keys", "show")
    result = runner.invoke(app, ["--config", str(config_path), "keys", "rotate"])
    assert result.exit_code != 0 and "--reason" in result.output
    assert not (tmp_path / "data" / "keys" / "retired").exists()
