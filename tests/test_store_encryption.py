"""Encryption at rest (R8, issue 13): `[store] encrypt = "sm4-gcm" | "aes-256-gcm"`.

The store and staging hold ciphertext in authenticated blocks; the evidence hash stays the plaintext's; the receiver
gets plaintext over the real broker; a flipped ciphertext byte is tamper for `verify` and the scrub, naming the
block; kill -9 mid-copy recovers; a key readable by others is refused; a chunk read at any offset decrypts right.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.atrest import (
    BLOCK_PLAIN,
    CREDENTIAL,
    HEADER_SIZE,
    NONCE,
    TAG,
    AtRest,
    StoreKeyError,
    Tampered,
    is_encrypted,
    read_key_file,
)
from edge_agent.catalog import Catalog, State
from edge_agent.cli import app
from edge_agent.config import ConfigError
from edge_agent.daemon import Agent
from edge_agent.digest import hash_stored
from edge_agent.evidence.scrub import Scrubber
from edge_agent.evidence.verify import verify_all
from edge_agent.ops.custody import tag
from edge_agent.protocol.wire import chunk_count, decode_chunk
from edge_agent.services.workspace import store_layout
from edge_agent.sync.sender import prepare_chunk
from tests.evidence_support import growing_partial, large_file, offline_agent_config, sha256_of
from tests.helpers import agent_config, make_recorder_volume, wait_for
from tests.opsdata import ingest_file
from tests.peers.mosquitto import Mosquitto
from tests.sync_support import (
    CLI,
    agent_proc,
    agent_setup,
    catalog_rows,
    enrol,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    states,
    stored_index,
)
from tests.test_crash_ingest import daemon, sealed_count

ALGORITHMS = ["sm4-gcm", "aes-256-gcm"]
ROOT = Path(__file__).resolve().parents[1]
STRIDE = NONCE + BLOCK_PLAIN + TAG


def store_key(tmp_path: Path, mode: int = 0o600) -> Path:
    """A store key as docs/OPERATIONS.md makes it (`openssl rand -hex 32`), outside the data dir."""
    path = tmp_path / "etc" / "store.key"
    path.parent.mkdir(exist_ok=True)
    out = subprocess.run(["openssl", "rand", "-hex", "32"], check=True, capture_output=True, text=True).stdout
    path.write_text(out)
    os.chmod(path, mode)
    return path


def flip(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def mp4(path: Path) -> Path:
    """A real one-second H.264 clip (ffmpeg's test source), so probing the encrypted copy has something to find."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "1",
                    "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)], check=True)
    return path


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_encrypted_store_syncs_plaintext_to_a_real_receiver_over_real_mosquitto(
        tmp_path: Path, mosquitto: Mosquitto, algorithm: str) -> None:
    dock = tmp_path / "dock"
    files = {"DCIM/A.MP4": 3 * BLOCK_PLAIN + 12_345, "DCIM/B.MP4": 0, "DCIM/C.MP4": BLOCK_PLAIN, "DCIM/D.MP4": 7}
    volume = make_recorder_volume(dock / ".prep", "VOL1", files)
    originals = {rel: (volume / rel).read_bytes() for rel in files}
    key = store_key(tmp_path)
    agent_toml, data_dir = agent_setup(tmp_path, mosquitto.port, dock_root=dock,
                                       store={"encrypt": algorithm, "key_file": str(key)})
    enrol(agent_toml, tmp_path / "enrolled")
    store = tmp_path / "store"
    receiver = receiver_proc(tmp_path, receiver_setup(tmp_path, mosquitto.port, store, tmp_path / "enrolled")).start()
    agent = agent_proc(tmp_path, agent_toml).start()
    try:
        wait_for(lambda: receiver_logged(tmp_path, "mqtt connected"), 20, what="receiver connected")
        os.rename(volume, dock / "VOL1")
        wait_for(lambda: states(data_dir).get("source_cleared", 0) == len(files), 90,
                 what=f"all files synced and cleared, have {states(data_dir)}")
    finally:
        assert agent.stop() == 0, (tmp_path / "agent.log").read_text()[-3000:]
        assert receiver.stop() == 0
    rows = {r[2]: r for r in catalog_rows(data_dir, "SELECT file_id, store_path, original_path, sha256 FROM files")}
    index = stored_index(store)
    for relative, plain in originals.items():
        file_id, store_path, _, sha = rows[relative]
        assert sha == hashlib.sha256(plain).hexdigest()                    # the evidence hash is the plaintext's
        on_disk = (data_dir / store_path).read_bytes()
        assert is_encrypted(store_path) and "_enc" in store_path
        assert len(on_disk) > len(plain) and on_disk[:8] == b"EAGTENC\n"
        if plain:
            assert plain[:64] not in on_disk and plain[-64:] not in on_disk   # not the plaintext, anywhere
        assert sha256_of(store / index[file_id]["object"]) == sha           # the receiver holds the plaintext
    verified = subprocess.run([*CLI, "--config", str(agent_toml), "verify"], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def encrypted_agent(tmp_path: Path, algorithm: str = "sm4-gcm") -> tuple[Path, Agent]:
    cfg_path, cfg = agent_config(tmp_path, store={"encrypt": algorithm, "key_file": str(store_key(tmp_path))})
    return cfg_path, Agent(cfg, dock_drivers=[])


def test_flipped_ciphertext_byte_is_tamper_for_verify_and_the_scrub_naming_file_and_block(tmp_path: Path) -> None:
    cfg_path, agent = encrypted_agent(tmp_path)
    victim = ingest_file(agent, tmp_path / "src", "clip.MP4", 3 * BLOCK_PLAIN + 99)
    other = ingest_file(agent, tmp_path / "src", "other.MP4", 5000)
    clip = mp4(tmp_path / "src" / "real.MP4")
    record, _ = agent.catalog.discover(kind="recorder", device_id="DSJ-A1-0001", original_path="real.MP4",
                                       source_path=str(clip), source_size=clip.stat().st_size,
                                       source_mtime_ns=clip.stat().st_mtime_ns, recorded_start_ms=1, actor="test")
    real = agent.ingestor.ingest(record, clip)
    media = json.loads(real.media or "{}")
    assert media.get("codec") == "h264" and media.get("duration_ms") == 1000     # probed through decryption
    assert verify_all(agent.catalog, agent.layout) == []

    flip(agent.layout.data_dir / victim.store_path, HEADER_SIZE + 2 * STRIDE + NONCE + 5)   # in block 2
    findings = verify_all(agent.catalog, agent.layout)
    assert [(f.subject, f.what) for f in findings] == [(victim.file_id, "media")]
    assert "block 2" in findings[0].message and "sm4-gcm tag" in findings[0].message
    cli = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "verify"])
    assert cli.exit_code != 0 and "block 2" in cli.stdout, cli.output

    Scrubber(agent.catalog, agent.layout, agent.config).run_once(force=True)
    alarms = agent.catalog.query("SELECT kind, subject, message FROM alarms WHERE cleared_ms IS NULL "
                                 "AND message LIKE 'scrub:%'")
    assert [(a["kind"], a["subject"]) for a in alarms] == [("tamper", victim.file_id)]
    assert "block 2" in alarms[0]["message"] and str(victim.store_path) in alarms[0]["message"]
    assert other.state == State.SEALED
    agent.catalog.close()


def test_export_bag_holds_plaintext_and_viewing_decrypts_to_a_copy(tmp_path: Path) -> None:
    cfg_path, agent = encrypted_agent(tmp_path, "aes-256-gcm")
    record = ingest_file(agent, tmp_path / "src", "clip.MP4", BLOCK_PLAIN + 3)
    tag(agent.catalog, agent.sealer, agent.layout, record.file_id, case_id="case-1", party="张三", actor="test")
    bag = tmp_path / "bag"
    result = CliRunner().invoke(app, ["--config", str(cfg_path), "--json", "export", "--case", "case-1", "--to",
                                      str(bag), "--reason", "court", "--approved-by", "李科长"])
    assert result.exit_code == 0, result.output
    exported = next((bag / "data" / "media").iterdir())
    assert exported.read_bytes() == (tmp_path / "src" / "clip.MP4").read_bytes()
    refused = CliRunner().invoke(app, ["--config", str(cfg_path), "view", record.file_id, "--reason", "review",
                                       "--approved-by", "李科长"])
    assert refused.exit_code != 0 and "--to" in refused.output
    viewed = CliRunner().invoke(app, ["--config", str(cfg_path), "view", record.file_id, "--reason", "review",
                                      "--approved-by", "李科长", "--to", str(tmp_path / "view")])
    assert viewed.exit_code == 0, viewed.output
    assert (tmp_path / "view" / f"{record.file_id}.mp4").read_bytes() == (tmp_path / "src" / "clip.MP4").read_bytes()
    agent.catalog.close()


def test_kill_9_mid_copy_with_encryption_then_restart_completes_the_file_intact(tmp_path: Path) -> None:
    root = tmp_path / "dock-sim"
    key = store_key(tmp_path)
    config_path, cfg = offline_agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(root)}],
                                            store={"encrypt": "sm4-gcm", "key_file": str(key)})
    volume = make_recorder_volume(root, "A123456", {"DCIM/100/SMALL.MP4": 70_000},
                                  identity={"DeviceID": "A123456", "PoliceID": "320102123"})
    big = "DCIM/100/BIG.MP4"
    large_file(volume / big, 128 << 20)
    layout = store_layout(cfg)
    log = tmp_path / "daemon.log"
    with daemon(config_path, log) as first:
        part = growing_partial(layout.staging)
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    assert part.exists() and is_encrypted(part)           # the crash left a partial encrypted copy behind
    with open(part, "rb") as partial:
        assert partial.read(8) == b"EAGTENC\n"
    with daemon(config_path, log) as second:
        wait_for(lambda: sealed_count(cfg.catalog_path) == 2 or second.poll() is not None, timeout=120,
                 what="both files sealed after restart")
        assert second.poll() is None, log.read_text()[-3000:]
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0, log.read_text()[-3000:]
    catalog = Catalog(cfg.catalog_path)
    rows = catalog.files()
    assert sorted(r.original_path for r in rows) == ["DCIM/100/BIG.MP4", "DCIM/100/SMALL.MP4"]
    assert list(layout.staging.glob("*.part")) == []
    for record in rows:
        stored = layout.data_dir / record.store_path
        assert is_encrypted(stored)
        assert record.sha256 == sha256_of(volume / record.original_path)
        assert hash_stored(stored, record.file_id, layout.at_rest) == (record.sha256, record.size)
    assert verify_all(catalog, layout) == []
    started = catalog.query("SELECT detail FROM audit WHERE action = 'agent.started' ORDER BY seq")
    assert '"partials_removed":1' in started[1]["detail"]
    catalog.close()


def test_store_key_readable_by_others_or_inside_the_data_dir_is_refused(tmp_path: Path) -> None:
    key = store_key(tmp_path, mode=0o644)
    with pytest.raises(StoreKeyError, match="chmod 600"):
        read_key_file(key)
    config_path, _ = agent_config(tmp_path, store={"encrypt": "sm4-gcm", "key_file": str(key)})
    run = subprocess.run([*CLI, "--config", str(config_path), "run"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "chmod 600" in run.stderr, run.stderr
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="inside data_dir"):
        agent_config(tmp_path / "b", store={"encrypt": "sm4-gcm", "key_file": str(tmp_path / "b" / "data" / "k")})
    os.chmod(key, 0o600)
    (key.parent / "bad.key").write_text("not hex")
    os.chmod(key.parent / "bad.key", 0o600)
    with pytest.raises(StoreKeyError, match="64 hex digits"):
        read_key_file(key.parent / "bad.key")
    with pytest.raises(StoreKeyError, match="no key is configured"):
        AtRest("sm4-gcm").key()


def test_the_systemd_credential_wins_over_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's LoadCredential= puts the key in $CREDENTIALS_DIRECTORY (systemd/edge-agent.service)."""
    key_file, credentials = store_key(tmp_path), tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL).write_text(subprocess.run(["openssl", "rand", "-hex", "32"], check=True,
                                                         capture_output=True, text=True).stdout)
    os.chmod(credentials / CREDENTIAL, 0o440)          # as an ACL granting the unit's user shows it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    at_rest = AtRest("sm4-gcm", key_file)
    assert at_rest.key_path() == credentials / CREDENTIAL
    assert at_rest.key().key_id != read_key_file(key_file).key_id
    assert f"LoadCredential={CREDENTIAL}" in (ROOT / "systemd" / "edge-agent.service").read_text()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_chunk_reads_at_odd_offsets_decrypt_only_right_bytes_and_moved_blocks_fail(
        tmp_path: Path, algorithm: str) -> None:
    at_rest = AtRest(algorithm, store_key(tmp_path))
    plain = os.urandom(3 * BLOCK_PLAIN + 1001)
    path = tmp_path / "01TESTFILEID0000000000000A_enc.mp4"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = at_rest.writer(fd, "01TESTFILEID0000000000000A")
    for at in range(0, len(plain), 77_777):          # written in pieces that straddle block edges
        writer.write(plain[at:at + 77_777])
    writer.close()
    os.close(fd)
    chunk_size = 100_003                              # odd: chunks start and end inside blocks
    for seq in range(chunk_count(len(plain), chunk_size)):
        header, data = decode_chunk(prepare_chunk(path, seq, len(plain), chunk_size, at_rest,
                                                  "01TESTFILEID0000000000000A"))
        assert bytes(data) == plain[header.offset:header.offset + header.size]
        assert header.offset == seq * chunk_size
    with at_rest.reader(path, "01TESTFILEID0000000000000A") as reader:
        assert reader.size == len(plain)
        for offset in (1, BLOCK_PLAIN - 1, BLOCK_PLAIN, 2 * BLOCK_PLAIN + 3, len(plain) - 5):
            assert reader.pread(999, offset) == plain[offset:offset + 999]
    with pytest.raises(Tampered, match="block 0"):    # the same bytes under another file id
        with at_rest.reader(path, "01TESTFILEID0000000000000B") as reader:
            reader.pread(10, 5)
    raw = bytearray(path.read_bytes())
    one, two = slice(HEADER_SIZE, HEADER_SIZE + STRIDE), slice(HEADER_SIZE + STRIDE, HEADER_SIZE + 2 * STRIDE)
    raw[one], raw[two] = raw[two], raw[one]            # two blocks swapped
    swapped = tmp_path / "swapped_enc.mp4"
    swapped.write_bytes(bytes(raw))
    with pytest.raises(Tampered, match="block 0"), at_rest.reader(swapped, "01TESTFILEID0000000000000A") as reader:
        reader.pread(10, 0)
    cut = tmp_path / "cut_enc.mp4"                     # the last block dropped: the one before is not marked last
    cut.write_bytes(path.read_bytes()[:HEADER_SIZE + 3 * STRIDE])
    with pytest.raises(Tampered, match="block 2"), at_rest.reader(cut, "01TESTFILEID0000000000000A") as reader:
        list(reader.blocks())
