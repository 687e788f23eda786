"""国密 crypto suites (docs/PROTOCOL.md "Crypto suites"): under `sm2` a sealed file's manifest carries an SM3 digest
and an SM2 signature that OpenSSL 3 verifies on the exact canonical bytes; OpenSSL's SM2 signatures are accepted
by ours; an `ed25519+sm2` document verifies under each key alone; rotation works under SM2; and a real daemon,
real mosquitto and a real receiver sync, receipt and clear a file under `sm2`. OpenSSL's CLI is the oracle."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import shutil
import subprocess
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from typer.testing import CliRunner

from edge_agent.catalog import Catalog
from edge_agent.cli import app
from edge_agent.clock import now_ms
from edge_agent.config import ConfigError
from edge_agent.evidence import suites
from edge_agent.evidence.keys import key_history
from edge_agent.evidence.manifest import (
    AgentKey,
    ManifestError,
    canonical_json,
    load_public_key,
    read_document,
    verify_signature,
)
from edge_agent.evidence.verify import verify_all
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from edge_agent.platform.receiver.keyring import KeyRefused, KeyRing
from tests.evidence_support import running_agent
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import (
    AGENT_ID,
    agent_proc,
    agent_setup,
    catalog_rows,
    enrol,
    receiver_logged,
    receiver_proc,
    receiver_setup,
)
from tests.test_chain import chain_settled, held_chain, local_chain, run_cli

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the OpenSSL CLI is the oracle")
DISTID = "distid:1234567812345678"


def cli(cfg_path: Path, *args: str) -> Any:
    result = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def openssl(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def sealed_manifests(tmp_path: Path, suite: str, files: dict[str, bytes | int]) -> tuple[Path, Any, list[dict]]:
    """An agent of `suite` imports a recorder volume; returns (config path, config, its file manifests)."""
    cfg_path, cfg = agent_config(tmp_path, crypto={"suite": suite})
    card = make_recorder_volume(tmp_path / "cards", "c1", files)
    cli(cfg_path, "import", str(card), "--device", "DSJ-1")
    layout = StoreLayout(cfg.agent.data_dir)
    docs = [read_document(layout.manifest_path(f["file_id"])) for f in cli(cfg_path, "files", "list")["files"]]
    return cfg_path, cfg, docs


def sm2_signed_bytes(doc: dict[str, Any]) -> bytes:
    """What SM2 signs: the canonical bytes of the document without `sig` and `sm2_sig` (docs/PROTOCOL.md)."""
    return canonical_json({k: v for k, v in doc.items() if k not in ("sig", "sm2_sig")})


def openssl_verifies(tmp: Path, doc: dict[str, Any], public_pem: str, message: bytes | None = None) -> bool:
    (tmp / "pub.pem").write_text(public_pem)
    (tmp / "msg").write_bytes(sm2_signed_bytes(doc) if message is None else message)
    (tmp / "sig.der").write_bytes(base64.b64decode(doc["sm2_sig"]))
    done = openssl("pkeyutl", "-verify", "-rawin", "-digest", "sm3", "-pubin", "-inkey", tmp / "pub.pem",
                   "-in", tmp / "msg", "-sigfile", tmp / "sig.der", "-pkeyopt", DISTID, ok=False)
    return done.returncode == 0 and "Signature Verified Successfully" in done.stdout


def sm2_block(pem: str) -> str:
    """The SM2 key's PEM block of a key set's PEM (its last block)."""
    return "-----BEGIN" + pem.split("-----BEGIN")[-1]


def test_a_file_sealed_under_sm2_verifies_with_openssl_and_its_sm3_is_openssls(tmp_path: Path) -> None:
    content = b"\x00\x01recording" * 150_000   # > 1 MiB: several blocks through the one streaming pass
    cfg_path, cfg, (doc,) = sealed_manifests(tmp_path, "sm2", {"DCIM/REC0001.MP4": content})
    keys = cfg.agent.data_dir / "keys"

    assert doc["key_id"].startswith("sm2:") and doc["sm2_key_id"] == doc["key_id"] and "sig" not in doc
    openssl("pkey", "-in", keys / "agent_ed25519.pem", "-noout")   # the key file is PEM OpenSSL reads
    derived = openssl("pkey", "-in", keys / "agent_ed25519.pem", "-pubout").stdout
    assert derived == (keys / "agent_ed25519.pub").read_text()
    stored = cfg.agent.data_dir / Catalog(cfg.catalog_path).get(doc["file_id"]).store_path
    assert openssl("dgst", "-sm3", "-r", stored).stdout.split()[0] == doc["sm3"]
    assert doc["sha256"] == hashlib.sha256(content).hexdigest()
    assert openssl_verifies(tmp_path, doc, derived)
    tampered = bytearray(sm2_signed_bytes(doc))
    tampered[40] ^= 0x01
    assert not openssl_verifies(tmp_path, doc, derived, bytes(tampered))
    assert verify_all(Catalog(cfg.catalog_path), StoreLayout(cfg.agent.data_dir)) == []
    shown = cli(cfg_path, "keys", "show")
    assert (shown["key_id"], shown["suite"]) == (doc["key_id"], "sm2")


def test_an_openssl_made_sm2_signature_and_key_are_accepted_and_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    openssl("genpkey", "-algorithm", "SM2", "-out", tmp_path / "k.pem")
    public = load_public_key(openssl("pkey", "-in", tmp_path / "k.pem", "-pubout").stdout)
    assert isinstance(public, suites.Sm2PublicKey)
    doc = {"v": 1, "type": "annotation", "note": "由 OpenSSL 签名", "key_id": public.key_id,
           "sm2_key_id": public.key_id}
    (tmp_path / "msg").write_bytes(sm2_signed_bytes(doc))
    openssl("pkeyutl", "-sign", "-rawin", "-digest", "sm3", "-inkey", tmp_path / "k.pem", "-in", tmp_path / "msg",
            "-out", tmp_path / "sig.der", "-pkeyopt", DISTID)
    sig = (tmp_path / "sig.der").read_bytes()
    signed = {**doc, "sm2_sig": base64.b64encode(sig).decode("ascii")}
    verify_signature(signed, public)

    for at in (len(sig) // 2, len(sig) - 1):
        flipped = bytearray(sig)
        flipped[at] ^= 0x01
        with pytest.raises(ManifestError, match="SM2 signature does not match"):
            verify_signature({**doc, "sm2_sig": base64.b64encode(bytes(flipped)).decode("ascii")}, public)
    with pytest.raises(ManifestError, match="SM2 signature does not match"):
        verify_signature({**signed, "note": "由 OpenSSL 签名!"}, public)
    # OpenSSL's private key file signs for us too, and OpenSSL verifies what it signs.
    key = AgentKey(suites.load_private_pem((tmp_path / "k.pem").read_bytes()))
    assert key.key_id == public.key_id
    ours = key.sign({"v": 1, "type": "annotation"})
    assert openssl_verifies(tmp_path, ours, suites.public_pem(public))


def test_a_dual_suite_document_verifies_under_each_key_alone(tmp_path: Path) -> None:
    cfg_path, cfg, (doc,) = sealed_manifests(tmp_path, "ed25519+sm2", {"a.mp4": 70_000})
    public = load_public_key((cfg.agent.data_dir / "keys" / "agent_ed25519.pub").read_bytes())
    assert isinstance(public, suites.DualPublicKey)
    assert doc["key_id"].startswith("ed25519:") and doc["sm2_key_id"].startswith("sm2:") and doc["sm3"]

    verify_signature(doc, public)
    verify_signature(doc, public.ed25519)
    verify_signature(doc, public.sm2)
    # An Ed25519 verifier that knows nothing of SM2 (canonical bytes without `sig`) accepts it as it is ...
    ed: Ed25519PublicKey = public.ed25519
    ed.verify(base64.b64decode(doc["sig"]), canonical_json({k: v for k, v in doc.items() if k != "sig"}))
    # ... and OpenSSL verifies the SM2 signature alone.
    assert openssl_verifies(tmp_path, doc, sm2_block(suites.public_pem(public)))
    # Each signature is needed: without the SM2 one the set refuses it; a changed SM2 signature breaks Ed25519's.
    with pytest.raises(ManifestError, match="no sm2_sig"):
        verify_signature({k: v for k, v in doc.items() if k != "sm2_sig"}, public.sm2)
    with pytest.raises(ManifestError, match="does not match"):
        verify_signature({k: v for k, v in doc.items() if k != "sm2_sig"}, public)
    other = AgentKey.generate("ed25519+sm2").sign(doc)
    with pytest.raises(ManifestError, match="signed by"):
        verify_signature(other, public.sm2)
    with pytest.raises(ManifestError):
        verify_signature({**doc, "sm2_sig": other["sm2_sig"]}, public.ed25519)

    bag = tmp_path / "bag"
    cli(cfg_path, "tag", doc["file_id"], "--case", "C-1", "--reason", "complaint")
    cli(cfg_path, "export", "--case", "C-1", "--to", str(bag), "--reason", "court", "--approved-by", "李科长")
    assert cli(cfg_path, "verify", "--bag", str(bag))["problems"] == []
    assert verify_all(Catalog(cfg.catalog_path), StoreLayout(cfg.agent.data_dir)) == []


def test_changing_the_suite_rotates_to_an_sm2_key_and_every_key_stays_trusted(tmp_path: Path) -> None:
    cfg_path, cfg = agent_config(tmp_path)
    cli(cfg_path, "import", str(make_recorder_volume(tmp_path / "cards", "c1", {"a.mp4": 3000})), "--device", "D1")
    layout = StoreLayout(cfg.agent.data_dir)
    ed_id = cli(cfg_path, "keys", "show")["key_id"]
    assert ed_id.startswith("ed25519:")

    sm2_path, sm2_cfg = agent_config(tmp_path, crypto={"suite": "sm2"})   # the operator switches the suite
    catalog = Catalog(sm2_cfg.catalog_path)
    try:
        sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys, "sm2"), layout, sm2_cfg)
        old, new = sealer.follow_suite() or ("", "")          # what the daemon does at start
        assert (old, new[:4]) == (ed_id, "sm2:") and sealer.follow_suite() is None
    finally:
        catalog.close()
    rotation = read_document(layout.data_dir / "rotations" / f"{new.split(':', 1)[1]}.json")
    assert rotation["sig"] and "sm2_sig" not in rotation    # signed by the old (Ed25519) key
    assert isinstance(load_public_key(rotation["new_public_key"]), suites.Sm2PublicKey)

    cli(sm2_path, "import", str(make_recorder_volume(tmp_path / "cards", "c2", {"b.mp4": 4000})), "--device", "D1")
    again = cli(sm2_path, "keys", "rotate", "--reason", "annual")   # SM2 to SM2
    assert again["old_key_id"] == new and again["key_id"].startswith("sm2:")
    cli(sm2_path, "import", str(make_recorder_volume(tmp_path / "cards", "c3", {"c.mp4": 5000})), "--device", "D1")
    by_path = {f["original_path"]: f["file_id"] for f in cli(sm2_path, "files", "list")["files"]}
    signers = [read_document(layout.manifest_path(by_path[p]))["key_id"] for p in ("a.mp4", "b.mp4", "c.mp4")]
    assert signers == [ed_id, new, again["key_id"]]
    catalog = Catalog(sm2_cfg.catalog_path)
    try:
        assert list(key_history(catalog, layout).keys) == [ed_id, new, again["key_id"]]
        assert verify_all(catalog, layout) == []
    finally:
        catalog.close()
    assert cli(sm2_path, "verify")["ok"]


def test_an_unknown_suite_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        agent_config(tmp_path, crypto={"suite": "sm9"})
    assert "suite" in str(caught.value) and "ed25519+sm2" in str(caught.value)


@pytest.mark.slow
def test_a_real_daemon_syncs_a_file_under_sm2_with_receipts_and_clears_it(tmp_path: Path, mosquitto: Mosquitto) -> None:
    dock = tmp_path / "dock"
    dock.mkdir()
    agent_toml, data_dir = agent_setup(tmp_path, mosquitto.port, dock_root=dock, evidence={"checkpoint_s": 1},
                                       crypto={"suite": "sm2"})
    enrol(agent_toml, tmp_path / "enrolled")
    assert "sm2" not in (tmp_path / "enrolled" / f"{AGENT_ID}.pem").read_text()   # PEM, no labels
    store = tmp_path / "store"
    receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, mosquitto.port, store, tmp_path / "enrolled")).start()
    wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
    agent = agent_proc(tmp_path, agent_toml).start()
    try:
        make_recorder_volume(dock / ".prep", "VOL1", {"DCIM/REC0001.MP4": 200_000})
        (dock / ".prep" / "VOL1").rename(dock / "VOL1")
        wait_for(lambda: [r[1] for r in catalog_rows(data_dir)] == ["source_cleared"], 60, what="synced and cleared")
        assert not (dock / "VOL1" / "DCIM" / "REC0001.MP4").exists()
        agent.stop()
        rotated = run_cli(agent_toml, "keys", "rotate", "--reason", "annual")
        assert rotated.returncode == 0, rotated.stderr
        agent.start()   # signs with the new SM2 key; the receiver learns it from the rotation in the chain
        make_recorder_volume(dock / ".prep", "VOL2", {"DCIM/REC0002.MP4": 5000})
        (dock / ".prep" / "VOL2").rename(dock / "VOL2")
        wait_for(lambda: [r[1] for r in catalog_rows(data_dir)] == ["source_cleared"] * 2, 60, what="VOL2 cleared")
        wait_for(lambda: chain_settled(data_dir, store), 60, what="the whole chain held and receipted")
        held = held_chain(store)
        assert len(held) == len(local_chain(data_dir))
        assert all(doc["key_id"].startswith("sm2:") and "sig" not in doc for doc in held.values())
        assert len({doc["key_id"] for doc in held.values()}) == 2 and any(
            doc["type"] == "key_rotation" for doc in held.values())
        learned = json.loads((store / "keys" / "learned" / f"{AGENT_ID}.json").read_text())
        assert [r["new_key_id"][:4] for r in learned["rotations"]] == ["sm2:"]
        receipts = catalog_rows(data_dir, "SELECT file_id FROM receipts")
        assert len(receipts) == 2
        verified = run_cli(agent_toml, "--json", "verify")
        assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stdout + verified.stderr
    finally:
        agent.stop()
        assert receiver.stop() == 0


@pytest.mark.parametrize("suite", ["sm2", "ed25519+sm2"])
def test_platform_commands_signed_with_sm2_are_obeyed_and_a_tampered_one_refused(
        tmp_path: Path, mosquitto: Mosquitto, suite: str) -> None:
    platform = AgentKey.generate(suite)
    (tmp_path / "platform.pem").write_text(platform.public_pem())
    _, cfg = agent_config(tmp_path, crypto={"suite": suite}, mqtt={
        "host": "127.0.0.1", "port": mosquitto.port, "reconnect_min_s": 0.1, "reconnect_max_s": 1,
        "command_keys": str(tmp_path / "platform.pem")})
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="platform", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()

    def send(command: dict[str, Any]) -> None:
        client.publish(f"evidence/v2/{cfg.agent.id}/commands", json.dumps(command).encode(), qos=1).wait_for_publish(5)

    def signed(seq: int) -> dict[str, Any]:
        return platform.sign({"cmd": "resync", "id": f"c{seq}", "ts": now_ms(), "seq": seq, "agent": cfg.agent.id})

    try:
        with running_agent(cfg) as agent:
            obeyed: queue.Queue[dict[str, Any]] = queue.Queue()
            agent.uplink.on_command(obeyed.put)
            wait_for(lambda: agent.uplink.stats()["connected"], 15, what="uplink connected")
            send({**signed(1), "cmd": "health"})          # tampered after signing
            good = signed(2)
            send(good)
            assert obeyed.get(timeout=10)["id"] == good["id"]
            refused = agent.catalog.query("SELECT reason FROM audit WHERE action = 'command.refused'")
            assert len(refused) == 1 and "signature does not match" in refused[0]["reason"]
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_receivers_key_ring_enrols_a_dual_key_and_learns_a_rotation_to_sm2(tmp_path: Path) -> None:
    dual, sm2 = AgentKey.generate("ed25519+sm2"), AgentKey.generate("sm2")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / f"{AGENT_ID}.pem").write_text(dual.public_pem())   # as `keys show` prints it
    ring = KeyRing(tmp_path / "agents", tmp_path / "learned")
    doc = dual.sign({"v": 1, "type": "annotation", "agent_id": AGENT_ID, "prev": "0" * 64})
    enrolled = ring.key_for(AGENT_ID, doc["key_id"])
    assert isinstance(enrolled, suites.DualPublicKey)
    verify_signature(doc, enrolled)                             # both signatures checked
    with pytest.raises(ManifestError):
        verify_signature({**doc, "sm2_sig": sm2.sign(doc)["sm2_sig"]}, enrolled)

    rotation = dual.sign({"v": 1, "type": "key_rotation", "agent_id": AGENT_ID, "old_key_id": dual.key_id,
                          "new_key_id": sm2.key_id, "new_public_key": sm2.public_pem(), "prev": "1" * 64})
    assert ring.learn_rotation(AGENT_ID, rotation, chain_seq=5) == sm2.key_id
    after = sm2.sign({"v": 1, "type": "annotation", "agent_id": AGENT_ID, "prev": "2" * 64})
    verify_signature(after, ring.key_for(AGENT_ID, after["key_id"], chain_seq=6))
    with pytest.raises(KeyRefused, match="retired"):
        ring.key_for(AGENT_ID, dual.key_id, chain_seq=7)


def test_an_import_as_the_data_dirs_owner_follows_a_changed_suite_before_signing(tmp_path: Path) -> None:
    cfg_path, cfg = agent_config(tmp_path)
    cli(cfg_path, "import", str(make_recorder_volume(tmp_path / "cards", "c1", {"a.mp4": 3000})), "--device", "D1")
    dual_path, _ = agent_config(tmp_path, crypto={"suite": "ed25519+sm2"})   # the same data dir, suite changed
    cli(dual_path, "import", str(make_recorder_volume(tmp_path / "cards", "c2", {"b.mp4": 3000})), "--device", "D1")
    layout = StoreLayout(cfg.agent.data_dir)
    by_path = {f["original_path"]: f["file_id"] for f in cli(dual_path, "files", "list")["files"]}
    b = read_document(layout.manifest_path(by_path["b.mp4"]))
    shown = cli(dual_path, "keys", "show")
    assert shown["suite"] == "ed25519+sm2" and b["key_id"] == shown["key_id"] and b["sig"] and b["sm2_sig"]
    assert "sm3" in b and "sm3" not in read_document(layout.manifest_path(by_path["a.mp4"]))
    catalog = Catalog(cfg.catalog_path)
    try:
        assert len(key_history(catalog, layout).rotations) == 1
        assert verify_all(catalog, layout) == []
    finally:
        catalog.close()
