"""Key rotation: the old key signs the hand-over, earlier documents keep verifying, nothing sealed is rewritten."""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edge_agent.catalog import Catalog
from edge_agent.cli import app
from edge_agent.evidence.manifest import (
    NEXT_KEY_FILE,
    AgentKey,
    begin_rotation,
    canonical_json,
    load_public_key,
    read_document,
    verify_signature,
    write_document,
)
from edge_agent.evidence.verify import verify_all
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from tests.evidence_support import offline_agent_config
from tests.helpers import agent_config, make_recorder_volume
from tests.test_crash_ingest import daemon
from tests.test_data_dir_owner import answering

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


def test_a_public_key_dropped_into_retired_with_a_forged_document_fails_verify_naming_it(tmp_path: Path) -> None:
    """Someone with write access to the data dir (not the signing key) makes a key of their own, drops its
    public half into keys/retired/, signs a document with it and chains it, and re-signs a manifest: neither
    verifies, because only the signed rotation chain from the genesis key makes a key trusted."""
    config_path, cfg = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 5_000})
    cli(config_path, "import", str(card), "--device", "ZFY0001", "--officer", "320102123")
    cli(config_path, "keys", "rotate", "--reason", "suspected exposure")
    data = tmp_path / "data"
    forger = AgentKey(Ed25519PrivateKey.generate())
    retired = data / "keys" / "retired"
    retired.mkdir(exist_ok=True)
    (retired / f"{forger.key_id.split(':')[1]}.pub").write_text(forger.public_pem())

    catalog = Catalog(cfg.catalog_path)
    try:
        (file_id,) = [r["file_id"] for r in catalog.query("SELECT file_id FROM files")]
        manifest_path = data / "manifests" / file_id[-2:] / f"{file_id}.json"
        manifest = read_document(manifest_path)
        forged_manifest = forger.sign({**manifest, "officer_id": "320109999"})
        manifest_path.chmod(0o644)
        digest = hashlib.sha256(write_document(manifest_path, forged_manifest)).hexdigest()
        catalog.update(file_id, manifest_sha256=digest)
        seq, prev = catalog.documents.head()
        forged = forger.sign({"v": 1, "type": "annotation", "agent_id": cfg.agent.id, "file_id": file_id,
                              "case_id": "2026-0117", "prev": prev})
        path = data / "annotations" / "forged.json"
        digest = hashlib.sha256(write_document(path, forged)).hexdigest()
        with catalog.transaction():
            catalog.documents.append(seq + 1, "annotation", "forged", digest, prev, "annotations/forged.json")
    finally:
        catalog.close()

    result = runner.invoke(app, ["--config", str(config_path), "--json", "verify", "--all"])
    assert result.exit_code == 1, result.output
    findings = json.loads(result.stdout)["findings"]
    about = {(f["subject"], f["what"]): f["message"] for f in findings}
    assert forger.key_id in about[(file_id, "manifest")] and "not in this agent's signed key history" in about[
        (file_id, "manifest")]
    assert forger.key_id in about[("forged", "chain")] and "key in force" in about[("forged", "chain")]
    # The untouched documents, signed before and after the rotation, still verify: nothing else is named.
    assert {subject for subject, _ in about} == {file_id, "forged"}


def test_running_daemon_signs_with_the_new_key_right_after_rotate(tmp_path: Path) -> None:
    """`keys rotate` beside a running daemon goes to it: the rotation document is signed by the old key and
    chained, and the very next manifest the daemon seals carries the new key and verifies, with no restart."""
    config_path, cfg = offline_agent_config(tmp_path)
    layout, log = StoreLayout(cfg.agent.data_dir), tmp_path / "daemon.log"
    with daemon(config_path, log) as proc:
        answering(layout, proc, log)
        first = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 20_000})
        cli(config_path, "import", str(first), "--device", "ZFY0001", "--officer", "320102123")
        old = cli(config_path, "keys", "show")

        rotated = cli(config_path, "keys", "rotate", "--reason", "annual rotation")

        assert rotated["via"] == "daemon" and rotated["old_key_id"] == old["key_id"] != rotated["key_id"]
        second = make_recorder_volume(tmp_path / "cards", "CARD2", {"DCIM/B.MP4": 20_000})
        cli(config_path, "import", str(second), "--device", "ZFY0002", "--officer", "320102123")
        assert proc.poll() is None   # the same daemon all along
        catalog = Catalog(cfg.catalog_path, readonly=True)
        try:
            chain = catalog.documents.chain()
            actors = [r["actor"] for r in catalog.query("SELECT actor FROM audit WHERE action = 'keys.rotated'")]
        finally:
            catalog.close()
        assert [r["kind"] for r in chain] == ["file", "session", "key_rotation", "file", "session"]
        rotation_row, next_row = chain[2], chain[3]
        rotation = read_document(layout.data_dir / rotation_row["path"])
        verify_signature(rotation, load_public_key(old["public_key_pem"]))          # signed by the old key
        assert (rotation["new_key_id"], rotation["prev"]) == (rotated["key_id"], chain[1]["sha256"])   # chained
        manifest = read_document(layout.data_dir / next_row["path"])
        assert manifest["key_id"] == rotated["key_id"] and manifest["prev"] == rotation_row["sha256"]
        verify_signature(manifest, load_public_key(rotated["public_key_pem"]))
        assert actors == [getpass.getuser()]    # the caller, from the kernel, not the daemon's account claim
        assert cli(config_path, "verify", "--all")["ok"] is True
        assert cli(config_path, "keys", "show")["key_id"] == rotated["key_id"]


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
    assert not (tmp_path / "data" / "rotations").exists()


def test_a_signer_in_another_process_signs_with_the_key_in_force_after_a_rotation(tmp_path: Path) -> None:
    """A custodian's `tag` loaded the key before the daemon rotated it: it still signs with the new key, because
    the key in force is read inside the signing transaction, so nothing after the rotation carries the old key."""
    _, cfg = agent_config(tmp_path)
    layout = StoreLayout(cfg.agent.data_dir).open()
    daemon_catalog, cli_catalog = Catalog(cfg.catalog_path), Catalog(cfg.catalog_path)
    try:
        daemon_sealer = Sealer(daemon_catalog, AgentKey.load_or_create(layout.keys), layout, cfg)
        cli_sealer = Sealer(cli_catalog, AgentKey.load_or_create(layout.keys), layout, cfg)
        daemon_sealer.sign_document("annotation", "a-1", {"note": "before"}, layout.data_dir / "annotations" / "1.json")
        old, new = daemon_sealer.rotate_key(reason="annual", actor="test", via="test")

        late = cli_sealer.sign_document("annotation", "a-2", {"note": "after"},
                                        layout.data_dir / "annotations" / "2.json")

        assert late["key_id"] == new != old
        assert verify_all(cli_catalog, layout) == []
    finally:
        daemon_catalog.close()
        cli_catalog.close()


def test_a_rotation_interrupted_before_its_document_was_chained_is_dropped_by_the_owner(tmp_path: Path) -> None:
    """A crash after the next key was written but before the rotation document was chained: no other process
    takes the next key for the key (it has no signed hand-over), and the owner drops it at start."""
    config_path, cfg = agent_config(tmp_path)
    before = cli(config_path, "keys", "show")["key_id"]
    keys = StoreLayout(cfg.agent.data_dir).keys
    begin_rotation(keys)        # ... and the process dies here
    assert cli(config_path, "keys", "show")["key_id"] == before
    card = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 5_000})
    cli(config_path, "import", str(card), "--device", "ZFY0001", "--officer", "320102123")   # the owner
    assert not (keys / NEXT_KEY_FILE).exists()
    assert cli(config_path, "keys", "show")["key_id"] == before
    assert cli(config_path, "verify", "--all")["ok"] is True


def test_audit_verify_checks_rotations_against_the_signed_key_history(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "CARD1", {"DCIM/A.MP4": 5_000})
    cli(config_path, "import", str(card), "--device", "ZFY0001", "--officer", "320102123")
    cli(config_path, "keys", "rotate", "--reason", "annual")
    assert cli(config_path, "audit", "verify")["ok"] is True
    (rotation,) = (tmp_path / "data" / "rotations").glob("*.json")
    rotation.chmod(0o644)
    rotation.write_bytes(canonical_json({**read_document(rotation), "reason": "rewritten"}))

    result = runner.invoke(app, ["--config", str(config_path), "--json", "audit", "verify"])

    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["problems"]
    assert any("key_rotation" in p and "signature" in p for p in problems), problems
    assert any("in the audit log, not in the signed rotation chain" in p for p in problems), problems
