"""Custody (R5): the checkout register tags files with their officer; tags are signed annotations that never
rewrite the manifest, and group the files of one case."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from edge_agent.catalog import LANE_EVIDENCE, Catalog
from edge_agent.cli import app
from edge_agent.evidence.manifest import load_public_key, read_document, verify_signature
from edge_agent.evidence.verify import verify_all
from edge_agent.layout import StoreLayout
from tests.helpers import agent_config, make_recorder_volume


def cli(cfg_path: Path, *args: str) -> dict | list:
    result = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_checkout_register_gives_imported_files_their_officer_until_return(tmp_path: Path) -> None:
    cfg_path, cfg = agent_config(tmp_path)
    before = make_recorder_volume(tmp_path / "cards", "before", {"DCIM/clip1.mp4": 1000}, age_s=3 * 3600)
    cli(cfg_path, "import", str(before), "--device", "DSJ-7")   # collected before the custodian assigned it
    assigned = cli(cfg_path, "assign", "DSJ-7", "--officer", "320102123", "--at", "2000-01-01T08:00:00+08:00",
                   "--reason", "shift A")
    during = make_recorder_volume(tmp_path / "cards", "during", {"DCIM/clip2.mp4": 1000}, age_s=60)
    cli(cfg_path, "import", str(during), "--device", "DSJ-7")
    cli(cfg_path, "return", "DSJ-7", "--reason", "end of shift")
    after = make_recorder_volume(tmp_path / "cards", "after", {"DCIM/clip3.mp4": 1000}, age_s=0)
    cli(cfg_path, "import", str(after), "--device", "DSJ-7")

    files = {f["original_path"]: f for f in cli(cfg_path, "files", "list", "--device", "DSJ-7")["files"]}
    assert files["DCIM/clip2.mp4"]["officer_id"] == "320102123"
    assert files["DCIM/clip3.mp4"]["officer_id"] is None
    # The file collected before the late assignment got the officer by a signed annotation.
    early = files["DCIM/clip1.mp4"]
    assert early["officer_id"] == "320102123" and assigned["files_given_officer"] == [early["file_id"]]
    catalog = Catalog(cfg.catalog_path)
    row = catalog.query("SELECT path FROM documents WHERE kind = 'annotation'")[0]
    annotation = read_document(cfg.agent.data_dir / row["path"])
    verify_signature(annotation, load_public_key((cfg.agent.data_dir / "keys" / "agent_ed25519.pub").read_bytes()))
    assert (annotation["file_id"], annotation["officer_id"]) == (early["file_id"], "320102123")
    actions = [r["action"] for r in catalog.query("SELECT action FROM audit WHERE subject = 'DSJ-7' ORDER BY seq")]
    assert actions == ["custody.assigned", "custody.returned"]
    devices = {d["device_id"]: d for d in cli(cfg_path, "devices")}
    assert devices["DSJ-7"]["officer"] is None


def test_tag_signs_an_annotation_without_rewriting_the_manifest(tmp_path: Path) -> None:
    cfg_path, cfg = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "c1", {"a.mp4": 2000, "b.mp4": 3000, "c.mp4": 100})
    cli(cfg_path, "import", str(card), "--device", "DSJ-9", "--officer", "320102999")
    by_path = {f["original_path"]: f for f in cli(cfg_path, "files", "list")["files"]}
    a, b = by_path["a.mp4"], by_path["b.mp4"]
    data_dir = cfg.agent.data_dir
    manifest_a = (data_dir / "manifests" / a["file_id"][-2:] / f"{a['file_id']}.json").read_bytes()

    tagged = cli(cfg_path, "tag", a["file_id"], b["file_id"], "--case", "鼓城管罚〔2026〕17号", "--party", "张三",
                 "--reason", "market stall complaint")

    assert (data_dir / "manifests" / a["file_id"][-2:] / f"{a['file_id']}.json").read_bytes() == manifest_a
    public = load_public_key((data_dir / "keys" / "agent_ed25519.pub").read_bytes())
    for annotation in tagged:
        doc = read_document(data_dir / "annotations" / f"{annotation['annotation_id']}.json")
        verify_signature(doc, public)
        assert doc["type"] == "annotation" and doc["case_id"] == "鼓城管罚〔2026〕17号" and doc["party"] == "张三"
    doc_a = next(d for d in tagged if d["file_id"] == a["file_id"])
    assert doc_a["file_sha256"] == a["sha256"]
    case_files = cli(cfg_path, "files", "list", "--case", "鼓城管罚〔2026〕17号")["files"]
    assert sorted(f["file_id"] for f in case_files) == sorted([a["file_id"], b["file_id"]])
    assert all(f["lane"] == LANE_EVIDENCE and f["retention"] == "evidence" and f["party"] == "张三"
               for f in case_files)
    catalog = Catalog(cfg.catalog_path)
    layout = StoreLayout(data_dir)
    assert verify_all(catalog, layout) == []


def test_tag_of_an_unknown_file_fails_and_changes_nothing(tmp_path: Path) -> None:
    cfg_path, cfg = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path / "cards", "c1", {"a.mp4": 100})
    cli(cfg_path, "import", str(card), "--device", "DSJ-1")
    result = CliRunner().invoke(app, ["--config", str(cfg_path), "tag", "01NOSUCHFILE", "--case", "X"])
    assert result.exit_code == 1
    assert "no file with id" in result.output
    assert Catalog(cfg.catalog_path).query("SELECT COUNT(*) FROM documents WHERE kind = 'annotation'")[0][0] == 0
