"""Export for court or long-term keeping (R6, R7): a BagIt bag a third party validates with standard tools,
with signed manifests that prove the media are the originals; every export is audited with requester,
approver and reason."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import bagit
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from edge_agent.cli import app
from edge_agent.daemon import Agent
from edge_agent.evidence.manifest import AgentKey, canonical_json, load_public_key, read_document, verify_signature
from edge_agent.ops.custody import tag
from edge_agent.ops.retention import Retention
from edge_agent.platform.receiver.receipts import PUB_FILE, ReceiverKey
from tests.helpers import agent_config
from tests.opsdata import confirm, ingest_file

CASE = "鼓城管罚〔2026〕17号"


def exported_case(tmp_path: Path) -> tuple[Path, Agent, list[str], str]:
    """Three files of a case (one already purged locally after sync) and one unrelated file."""
    ReceiverKey.load_or_create(tmp_path / "receiver-key")   # the platform's receipt key, pinned by the agent
    cfg_path, cfg = agent_config(tmp_path, mqtt={"receiver_keys": str(tmp_path / "receiver-key" / PUB_FILE)})
    agent = Agent(cfg, dock_drivers=[])
    src = tmp_path / "src"
    files = [ingest_file(agent, src, f"clip{i}.MP4", 50_000 + i) for i in range(3)]
    ingest_file(agent, src, "other.MP4", 1000)
    purged = confirm(agent, files[2].file_id)
    Retention(agent.catalog, agent.layout, cfg).purge(purged.file_id, "test: confirmed and purged")
    for record in files:
        tag(agent.catalog, agent.sealer, agent.layout, record.file_id, case_id=CASE, party="张三", actor="test")
    return cfg_path, agent, [f.file_id for f in files], purged.file_id


def test_export_writes_a_bag_that_bagit_validates_and_signatures_prove(tmp_path: Path) -> None:
    cfg_path, agent, file_ids, purged_id = exported_case(tmp_path)
    bag_dir = tmp_path / "court" / "case17"

    result = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "export", "--case", CASE, "--to",
                                      str(bag_dir), "--reason", "court hearing 2026-12-03",
                                      "--approved-by", "李科长", "--requested-by", "wang.fa"])

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 3 and summary["not_local"] == [purged_id] and summary["ok"]
    bag = bagit.Bag(str(bag_dir))
    bag.validate()
    third_party = subprocess.run([str(Path(sys.executable).parent / "bagit.py"), "--validate", str(bag_dir)],
                                 capture_output=True, text=True)
    assert third_party.returncode == 0, third_party.stderr
    assert bag.info["Export-Approved-By"] == "李科长"
    assert bag.info["Export-Requested-By"] == "wang.fa"
    assert bag.info["Export-Reason"] == "court hearing 2026-12-03"
    assert bag.info["Export-Verification"] == "passed"

    data = bag_dir / "data"
    public = load_public_key((data / "keys" / "agent_ed25519.pub").read_bytes())
    report = json.loads((data / "verification.json").read_text())
    assert report["ok"] and {f["file_id"] for f in report["files"]} == set(file_ids)
    for file_id in file_ids:
        manifest = read_document(data / "manifests" / f"{file_id}.json")
        verify_signature(manifest, public)
        entry = next(f for f in report["files"] if f["file_id"] == file_id)
        assert len(entry["annotations"]) == 1
        verify_signature(read_document(data / entry["annotations"][0]), public)
        if file_id == purged_id:
            assert entry["media"] is None
            # The platform's receipt proves it holds the purged file: signed by a receiver key in the bag,
            # bound to the manifest in the bag byte for byte.
            receipt = read_document(data / entry["receipt"])
            receiver = load_public_key(next((data / "keys" / "receivers").glob("*.pem")).read_bytes())
            verify_signature(receipt, receiver)
            manifest_bytes = (data / "manifests" / f"{file_id}.json").read_bytes()
            assert receipt["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
            assert (receipt["file_id"], receipt["sha256"]) == (file_id, manifest["sha256"])
            continue
        assert entry["receipt"] is None   # not synced: no receipt
        media = (data / entry["media"]).read_bytes()
        assert hashlib.sha256(media).hexdigest() == manifest["sha256"]
    assert "other.MP4" not in json.dumps(report)

    export_entry = agent.catalog.query("SELECT * FROM audit WHERE action = 'export'")[0]
    detail = json.loads(export_entry["detail"])
    assert export_entry["actor"] == "wang.fa" and export_entry["reason"] == "court hearing 2026-12-03"
    assert detail["approved_by"] == "李科长" and detail["files"] == 3
    per_file = agent.catalog.query("SELECT subject FROM audit WHERE action = 'file.exported'")
    assert sorted(r["subject"] for r in per_file) == sorted(file_ids)


def test_a_changed_byte_in_an_exported_bag_fails_validation(tmp_path: Path) -> None:
    cfg_path, _agent, file_ids, _ = exported_case(tmp_path)
    bag_dir = tmp_path / "bag"
    result = CliRunner().invoke(app, ["--config", str(cfg_path), "export", "--case", CASE, "--to", str(bag_dir),
                                      "--reason", "archive", "--approved-by", "李科长"])
    assert result.exit_code == 0, result.output
    media = next((bag_dir / "data" / "media").iterdir())
    raw = bytearray(media.read_bytes())
    raw[100] ^= 0xFF
    media.write_bytes(bytes(raw))

    third_party = subprocess.run([str(Path(sys.executable).parent / "bagit.py"), "--validate", str(bag_dir)],
                                 capture_output=True, text=True)
    assert third_party.returncode != 0


def test_export_refuses_unknown_case_and_non_empty_target_and_logs_no_export(tmp_path: Path) -> None:
    cfg_path, agent, _, _ = exported_case(tmp_path)
    runner = CliRunner()
    base = ["--config", str(cfg_path), "export", "--reason", "r", "--approved-by", "a"]
    unknown = runner.invoke(app, [*base, "--case", "NO-SUCH", "--to", str(tmp_path / "x")])
    assert unknown.exit_code == 1 and "no files are tagged" in unknown.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("keep me")
    occupied = runner.invoke(app, [*base, "--case", CASE, "--to", str(busy)])
    assert occupied.exit_code == 1 and "not empty" in occupied.output
    assert (busy / "something").read_text() == "keep me"
    assert agent.catalog.query("SELECT COUNT(*) FROM audit WHERE action = 'export'")[0][0] == 0


def test_viewing_a_file_needs_an_approver_and_is_audited(tmp_path: Path) -> None:
    cfg_path, agent, file_ids, purged_id = exported_case(tmp_path)
    runner = CliRunner()
    base = ["--config", str(cfg_path), "--json", "view"]

    refused = runner.invoke(app, [*base, file_ids[0], "--reason", "complaint review"])
    assert refused.exit_code != 0
    viewed = runner.invoke(app, [*base, file_ids[0], "--reason", "complaint review", "--approved-by", "李科长",
                                 "--to", str(tmp_path / "playback")])
    assert viewed.exit_code == 0, viewed.output
    copy = Path(json.loads(viewed.stdout)["path"])
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == agent.catalog.get(file_ids[0]).sha256
    gone = runner.invoke(app, [*base, purged_id, "--reason", "r", "--approved-by", "a"])
    assert gone.exit_code == 1 and "view it on the platform" in gone.output

    entries = agent.catalog.query("SELECT * FROM audit WHERE action = 'file.viewed'")
    assert [e["subject"] for e in entries] == [file_ids[0]]
    detail = json.loads(entries[0]["detail"])
    assert entries[0]["reason"] == "complaint review" and detail["approved_by"] == "李科长"
    assert detail["requested_by"]


def _documented(marker: str, fence: str) -> str:
    """The code block of docs/OPERATIONS.md right after `marker`, exactly as a reader copies it."""
    text = (Path(__file__).parent.parent / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    after = text[text.index(marker):]
    start = after.index(f"```{fence}\n") + len(fence) + 4
    return after[start:after.index("```\n", start)]


def test_bag_exported_after_two_rotations_verifies_from_the_bag_alone(tmp_path: Path) -> None:
    """Files sealed under three keys (two rotations between them) and annotated under the last: the bag
    carries every key and rotation document, and the documented stock-Python procedure, the documented
    openssl commands and `verify --bag` all pass it using nothing but the bag."""
    cfg_path, cfg = agent_config(tmp_path)
    agent = Agent(cfg, dock_drivers=[])
    src = tmp_path / "src"
    files = [ingest_file(agent, src, "clip0.MP4", 40_000)]
    for n in (1, 2):
        agent.sealer.rotate_key(reason=f"rotation {n}", actor="test", via="test")
        files.append(ingest_file(agent, src, f"clip{n}.MP4", 40_000 + n))
    for record in files:
        tag(agent.catalog, agent.sealer, agent.layout, record.file_id, case_id=CASE, party="张三", actor="test")
    bag_dir = tmp_path / "bag"

    result = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "export", "--case", CASE, "--to",
                                      str(bag_dir), "--reason", "court", "--approved-by", "李科长"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["problems"] == []
    data = bag_dir / "data"
    signers = {read_document(data / "manifests" / f"{r.file_id}.json")["key_id"] for r in files}
    history = json.loads((data / "keys" / "key_history.json").read_text())
    assert len(signers) == 3 and [k["key_id"] for k in history["keys"]] == sorted(signers, key=[
        k["key_id"] for k in history["keys"]].index)
    agent.stop()

    script = tmp_path / "verify_bag.py"
    script.write_text(_documented("<!-- verify_bag.py -->", "python"), encoding="utf-8")
    stock = [sys.executable, "-I", "-S", str(script), str(bag_dir)]   # no site-packages: no cryptography
    run = subprocess.run(stock, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.endswith("OK\n"), run.stdout + run.stderr
    by_hand = _documented("One document by hand", "bash").replace("data/manifests/F.json", f"data/manifests/"
                                                                 f"{files[2].file_id}.json")
    by_hand = by_hand.replace("KEYID", history["keys"][2]["key_id"].split(":")[1])
    openssl = subprocess.run(["bash", "-e", "-c", by_hand], cwd=bag_dir, capture_output=True, text=True)
    assert openssl.returncode == 0 and "Signature Verified Successfully" in openssl.stdout, openssl.stderr
    assert CliRunner().invoke(app, ["--json", "verify", "--bag", str(bag_dir)]).exit_code == 0

    # The same checks fail a bag whose annotation was re-signed by a key outside the history (bag re-made).
    forged = tmp_path / "forged"
    shutil.copytree(bag_dir, forged)
    annotation = next((forged / "data" / "annotations").glob("*.json"))
    stranger = AgentKey(Ed25519PrivateKey.generate())
    annotation.write_bytes(canonical_json(stranger.sign({**read_document(annotation), "party": "李四"})))
    bagit.Bag(str(forged)).save(manifests=True)
    assert subprocess.run([*stock[:-1], str(forged)], capture_output=True, text=True).returncode == 1
    checked = CliRunner().invoke(app, ["--json", "verify", "--bag", str(forged)])
    assert checked.exit_code == 1 and stranger.key_id in checked.stdout


def test_export_counts_a_bag_that_cannot_be_verified_as_problems(tmp_path: Path) -> None:
    """A rotation document altered in the data dir breaks the key history: the export says so in problems=
    and Export-Verification instead of reporting a bag that fails as passed."""
    cfg_path, cfg = agent_config(tmp_path)
    agent = Agent(cfg, dock_drivers=[])
    agent.sealer.rotate_key(reason="annual", actor="test", via="test")
    record = ingest_file(agent, tmp_path / "src", "clip.MP4", 30_000)
    tag(agent.catalog, agent.sealer, agent.layout, record.file_id, case_id=CASE, party=None, actor="test")
    (rotation,) = (agent.layout.data_dir / "rotations").glob("*.json")
    rotation.chmod(0o644)
    rotation.write_bytes(canonical_json({**read_document(rotation), "reason": "rewritten"}))
    agent.stop()

    result = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "export", "--case", CASE, "--to",
                                      str(tmp_path / "bag"), "--reason", "court", "--approved-by", "李科长"])

    assert result.exit_code != 0 or json.loads(result.stdout)["problems"], result.output
    summary = json.loads(result.stdout)
    assert any("key_rotation" in p or "key history" in p for p in summary["problems"]), summary["problems"]
    assert bagit.Bag(str(tmp_path / "bag")).info["Export-Verification"] != "passed"
