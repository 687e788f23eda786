"""Camera-signed video (ONVIF Media Signing) on ONVIF's own sample recordings: the signed ones verify `valid`
against their ca.pem, the unsigned ones are `unsigned`, another CA makes them `invalid`, one flipped byte of a
frame makes them `invalid`; recorded by the agent from the real GStreamer RTSP server, every NAL unit reaches
the segment byte for byte and the segments' manifests say `valid`; a signed camera whose stream turns
invalid raises camera_signature_invalid."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from drivers.media_signing import (
    INVALID,
    ONVIF_UUID,
    UNSIGNED,
    UNVERIFIABLE,
    VALID,
    GopChecker,
    check_file,
    hashable,
    iter_nals,
    length_prefixed,
    load_anchors,
    look,
    nal_info,
    segment_verdict,
    split_nals,
)
from edge_agent.daemon import build_agent
from edge_agent.sources.cameras import spool_dir
from tests.helpers import wait_for
from tests.peers.mosquitto import free_port
from tests.peers.rtsp_server import RtspServer
from tests.test_cameras import ROOT, camera, cameras_config, manifest, sealed_segments

SAMPLES = Path("/work/shared/testdata/onvif-media-signing")
if not SAMPLES.is_dir():   # a fresh machine: the copy beside the checkout (docs/CAMERAS.md)
    SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "onvif-media-signing"
CODECS = ["h264", "h265"]

pytestmark = pytest.mark.skipif(not (SAMPLES / "ca.pem").is_file(),
                                reason=f"ONVIF's media-signing samples are not at {SAMPLES}")


def anchors() -> list[x509.Certificate]:
    return load_anchors((SAMPLES / "ca.pem").read_bytes())


def other_ca(tmp_path: Path) -> Path:
    """A CA of our own, with the same name as the samples' one: only its key differs."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SomeOrg"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Test RootCA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = tmp_path / "other-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def sample_nals(codec: str, signed: bool = True) -> list[bytes]:
    with av.open(str(SAMPLES / f"test_{'signed_' if signed else ''}{codec}.mp4")) as container:
        return list(iter_nals(container, container.streams.video[0]))


def verdict_of(nals: list[bytes], codec: str, trust: list[x509.Certificate] | None) -> dict[str, object]:
    checker = GopChecker(codec == "h265", trust)
    for nal in nals:
        checker.feed(nal, 0)
    checker.finish()
    return segment_verdict(checker.results(0), checker.signing)


@pytest.mark.parametrize("codec", CODECS)
def test_signed_samples_verify_valid_against_their_ca(codec: str) -> None:
    verdict = check_file(str(SAMPLES / f"test_signed_{codec}.mp4"), anchors())
    assert verdict["status"] == VALID and verdict["format"] == "onvif"
    # Five GOPs: four signed by the SEI that follows them; the last one's SEI never comes (the file ends).
    assert verdict["gops"] == 5 and verdict["gops_valid"] == 4 and verdict["gops_unchecked"] == 1
    signer = verdict["signer"]
    assert signer["subject"] == "CN=Test camera,OU=Test,O=SomeOrg"
    assert signer["issuer"] == "CN=Test RootCA,OU=Test,O=SomeOrg"
    assert signer["manufacturer"] == "Signed Media Framework"


@pytest.mark.parametrize("codec", CODECS)
def test_unsigned_samples_are_unsigned(codec: str) -> None:
    verdict = check_file(str(SAMPLES / f"test_{codec}.mp4"), anchors())
    assert verdict["status"] == UNSIGNED and verdict["gops"] == 5 and "format" not in verdict


@pytest.mark.parametrize("codec", CODECS)
def test_another_ca_makes_them_invalid_and_no_ca_unverifiable(codec: str, tmp_path: Path) -> None:
    foreign = load_anchors(other_ca(tmp_path).read_bytes())
    verdict = check_file(str(SAMPLES / f"test_signed_{codec}.mp4"), foreign)
    # The signatures are intact (they verify with the stream's own certificate), but that certificate does not
    # lead to the configured CA: the camera named is not the one that signed. A forger re-signing with a key
    # of his own looks exactly like this, so it is `invalid`, not merely `unverifiable`.
    assert verdict["status"] == INVALID and verdict["gops_valid"] == 0
    assert "does not lead to a configured signing_ca" in verdict["reason"]
    # Without any CA configured, nothing says whose key it is: integrity holds, provenance is unknown.
    verdict = check_file(str(SAMPLES / f"test_signed_{codec}.mp4"), None)
    assert verdict["status"] == UNVERIFIABLE and "no signing_ca configured" in verdict["reason"]


@pytest.mark.parametrize("codec", CODECS)
def test_one_flipped_byte_of_a_frame_is_invalid(codec: str) -> None:
    nals = sample_nals(codec)
    assert verdict_of(nals, codec, anchors())["status"] == VALID
    hevc = codec == "h265"
    starts = [i for i, nal in enumerate(nals) if nal_info(nal, hevc).gop_start]
    target = starts[1] + 10            # a P frame in the second GOP
    assert nal_info(nals[target], hevc).kind == "slice"
    flipped = bytearray(nals[target])
    flipped[len(flipped) // 2] ^= 0x01
    tampered = [*nals[:target], bytes(flipped), *nals[target + 1:]]
    verdict = verdict_of(tampered, codec, anchors())
    assert verdict["status"] == INVALID
    position = sum(1 for nal in nals[starts[1]:target] if nal_info(nal, hevc).kind == "slice")
    assert verdict["reason"] == f"NAL unit(s) [{position}] of the GOP differ from what the camera signed"
    assert verdict["gops_valid"] == 3

    # A byte of a signature flipped: that GOP's signature no longer verifies.
    sei = next(i for i, nal in enumerate(nals) if nal_info(nal, hevc).signing == "onvif")
    broken = bytearray(nals[sei])
    broken[-20] ^= 0x01
    verdict = verdict_of([*nals[:sei], bytes(broken), *nals[sei + 1:]], codec, anchors())
    assert verdict["status"] == INVALID and verdict["reason"] == "the SEI's signature does not verify"

    # A whole GOP taken out with its SEI: the next SEI's counter and linked hash say so.
    sei2 = next(i for i, nal in enumerate(nals) if i > starts[2] and nal_info(nal, hevc).signing == "onvif")
    cut = [*nals[:starts[1]], *nals[starts[2]:sei2], *nals[sei2 + 1:]]
    verdict = verdict_of(cut, codec, anchors())
    assert verdict["status"] == INVALID


def maybe_signing(data: bytes | av.Packet, prefixed: bool, hevc: bool) -> bool:
    """Whether `look` says an access unit may hold a signing SEI."""
    return look(data, prefixed, hevc)[0]


def annexb_units(path: Path) -> list[tuple[av.Packet, bool]]:
    """A recording's access units in start-code form, as FFmpeg's RTSP demuxer gives them: (unit, keyframe)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        bsf = av.BitStreamFilterContext(f"{video.codec_context.name}_mp4toannexb", video)
        return [(out, out.is_keyframe) for packet in container.demux(video) if packet.size
                for out in bsf.filter(packet)]


@pytest.mark.parametrize("codec", CODECS)
def test_the_look_for_signing_seis_in_every_packet_finds_every_one(codec: str, tmp_path: Path) -> None:
    """`look` runs for every packet of a camera that does not sign, so it reads as little as it may:
    it must still say yes to every access unit of the signed sample that holds a signing SEI (given the PyAV
    packet itself, or its bytes), and no to the others."""
    hevc = codec == "h265"
    units = [unit for unit, _ in annexb_units(camera_file(codec, tmp_path / f"camera-{codec}.mp4"))]
    signing = [any(nal_info(nal, hevc).signing for nal in split_nals(bytes(u), False)) for u in units]
    assert sum(signing) >= 4
    assert [maybe_signing(u, False, hevc) for u in units] == signing
    assert [maybe_signing(bytes(u), False, hevc) for u in units] == signing


@pytest.mark.parametrize("codec", CODECS)
def test_access_units_split_only_where_it_matters_give_every_verdict_of_a_full_split(
        codec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder hands the checker whole packets (`feed_unit`), and an unsigned camera's are not split once
    the checker hashes nothing. A camera that sends ONVIF's unsigned sample twice and then begins signing (its
    signed sample) gets the same verdict for every GOP, and its signature checked as soon, as when every NAL
    unit is fed; and of the unsigned stretch only the first GOPs' units were split."""
    hevc = codec == "h265"
    unsigned = annexb_units(SAMPLES / f"test_{codec}.mp4") * 2   # ten GOPs
    units = [*unsigned, *annexb_units(camera_file(codec, tmp_path / "cam.mp4"))]
    whole = GopChecker(hevc, anchors())
    for unit, _ in units:
        for nal in split_nals(bytes(unit), False):
            whole.feed(nal, 0)
    split = []
    monkeypatch.setattr("drivers.media_signing.split_nals", lambda data, prefixed: split.append(data) or
                        split_nals(data, prefixed))
    by_unit = GopChecker(hevc, anchors())
    for n, (unit, key) in enumerate(units):
        if n == len(unsigned):
            # the first copy's GOPs (hashed until found unsigned) and the GOP start that ends the last one hashed
            assert len(split) == len(unsigned) // 2 + 1
        by_unit.feed_unit(unit, False, key, 0)
    whole.finish()
    by_unit.finish()
    assert by_unit.results(0) == whole.results(0)
    statuses = [r.status for r in whole.results(0)]
    assert statuses.count(UNSIGNED) == 10 and statuses.count(VALID) >= 2


def test_the_look_for_signing_seis_reads_where_the_standards_put_them() -> None:
    """H.264: SEIs precede the first slice (7.4.1.2.3), so the UUID's bytes inside a slice are not a SEI and
    are not read; a SEI longer than the part read first is read whole. H.265 also has suffix SEIs, after the
    slices (7.4.2.4.4): the whole unit is read. Length-prefixed units (files) are read whole."""
    sc = b"\x00\x00\x00\x01"
    sei = b"\x06\x05\x10" + ONVIF_UUID + b"\x80"
    slice_with_uuid = b"\x41\x9a" + bytes(range(1, 200)) + ONVIF_UUID + bytes(range(1, 200))
    assert maybe_signing(sc + sei + sc + slice_with_uuid, False, False)
    assert not maybe_signing(sc + slice_with_uuid, False, False)
    long_sei = b"\x06\x05\xff\xff\x02" + ONVIF_UUID + bytes(range(1, 256)) * 2 + b"\x80"
    assert maybe_signing(sc + b"\x09\xf0" + sc + long_sei + sc + b"\x41\x9a\x01", False, False)
    hevc_slice = b"\x02\x01\xd0" + bytes(range(1, 200))
    suffix_sei = b"\x50\x01\x05\x10" + ONVIF_UUID + b"\x80"
    assert maybe_signing(sc + hevc_slice + sc + suffix_sei, False, True)
    assert not maybe_signing(sc + hevc_slice, False, True)
    assert maybe_signing(len(slice_with_uuid).to_bytes(4, "big") + slice_with_uuid, True, False)


def escape(nal: bytes) -> bytes:
    """Emulation prevention as H.264/H.265 require it in a NAL unit: 0x03 after two zero bytes when the next
    byte is 0..3. ONVIF's samples hold their SEIs unescaped (the MP4 length prefixes carry them), and an
    unescaped SEI cannot travel as a byte stream (RTP, Annex B): its zeros read as start codes."""
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def camera_file(codec: str, dest: Path, flip_in_gop: int | None = None) -> Path:
    """The signed sample as a camera sends it (its SEIs escaped, a frame every 40 ms), optionally with one byte
    of a P frame of GOP `flip_in_gop` flipped. A remux: every other byte stays as ONVIF's signer wrote it."""
    hevc = codec == "h265"
    with av.open(str(SAMPLES / f"test_signed_{codec}.mp4")) as src, av.open(str(dest), "w", format="mp4") as out:
        video = src.streams.video[0]
        stream = out.add_stream_from_template(video)
        prefixed = length_prefixed(video.codec_context.extradata)
        gop = frame = count = 0
        for packet in src.demux(video):
            if not packet.size:
                continue
            nals = []
            for nal in split_nals(bytes(packet), prefixed):
                info = nal_info(nal, hevc)
                if info.gop_start:
                    gop, frame = gop + 1, 0
                elif info.kind == "slice":
                    frame += 1
                    if gop == flip_in_gop and frame == 10:
                        nal = bytearray(nal)
                        nal[len(nal) // 2] ^= 0x01
                        nal = bytes(nal)
                nals.append(escape(nal) if info.signing else nal)
            copy = av.Packet(b"".join(len(n).to_bytes(4, "big") + n for n in nals))
            # The samples repeat timestamps (their first seven frames are all at 0): a frame every 1/25 s.
            copy.pts = copy.dts = count * (video.time_base.denominator // 25)
            copy.duration, copy.time_base = video.time_base.denominator // 25, video.time_base
            count += 1
            copy.is_keyframe = packet.is_keyframe
            copy.stream = stream
            out.mux(copy)
    return dest


def stored_nals(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return list(iter_nals(container, container.streams.video[0]))


@pytest.fixture(params=[pytest.param(c, marks=() if c == "h264" else pytest.mark.extended) for c in CODECS])
def signing_camera(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, RtspServer]]:
    codec = request.param
    served = camera_file(codec, tmp_path / f"camera-{codec}.mp4")
    server = RtspServer(free_port(), replay=served, log=tmp_path / "rtsp.log").start()
    yield codec, served, server
    server.stop()


def test_recorded_over_rtsp_every_nal_unit_is_kept_and_the_segments_verify(
        tmp_path: Path, signing_camera: tuple[str, Path, RtspServer]) -> None:
    codec, served, server = signing_camera
    hevc = codec == "h265"
    _, cfg = cameras_config(tmp_path, [camera("gate-signed", rtsp=server.url,
                                              signing_ca=str(SAMPLES / "ca.pem"))])
    data_dir = cfg.agent.data_dir

    def first_connection() -> list | None:
        """The sealed segments up to the one the end of the recording cut (its last GOP never got a SEI)."""
        segments = sealed_segments(agent.catalog, "gate-signed")
        docs = [manifest(data_dir, s.file_id) for s in segments]
        end = next((i for i, d in enumerate(docs) if d["signing"]["gops_unchecked"]), None)
        return None if end is None else list(zip(segments[:end + 1], docs[:end + 1], strict=True))

    agent = build_agent(cfg)
    agent.start()
    try:
        # The 10-s recording plays once (GOPs of 62 frames, 2.5 s: one segment each), then the server ends it.
        recorded = wait_for(first_connection, timeout=40, what="the segments of one playing of the recording")
        status = agent.cameras.camera_status()[0]
    finally:
        agent.stop()

    def kind(nal: bytes) -> int:
        return (nal[0] >> 1) & 0x3F if hevc else nal[0] & 0x1F

    # NAL units in (what the camera sent) and out (what the segments hold), byte for byte and in order, from the
    # first keyframe the agent got to the end of the recording. The RTP payloader repeats the parameter sets
    # before each keyframe (config-interval=-1): they are the camera's own, outside the signature by ONVIF's
    # design, and equal to the ones in the file.
    parameter_sets = (32, 33, 34) if hevc else (7, 8)
    sent_all = [hashable(n) for n in stored_nals(served)]
    kept_all = [hashable(n) for s, _ in recorded for n in stored_nals(data_dir / s.store_path)]
    sent = [n for n in sent_all if kind(n) not in parameter_sets]
    kept = [n for n in kept_all if kind(n) not in parameter_sets]
    start = sent.index(kept[0])
    assert nal_info(kept[0], hevc).gop_start
    assert kept == sent[start:]
    assert {n for n in kept_all if kind(n) in parameter_sets} <= set(split_nals(_extradata_nals(served), False))
    signing_seis = [n for n in kept if nal_info(n, hevc).signing == "onvif"]
    assert signing_seis == [n for n in sent[start:] if nal_info(n, hevc).signing == "onvif"] and signing_seis
    # Every segment but the one the end of the recording cut verifies; that one's GOP never got its SEI.
    docs = [doc for _, doc in recorded]
    assert len(docs) >= 3
    for doc in docs[:-1]:
        assert doc["signed"] == VALID, doc["signing"]
        assert doc["signing"]["gops_valid"] == doc["signing"]["gops"] and doc["signing"]["gops_unchecked"] == 0
        assert doc["signing"]["signer"]["subject"] == "CN=Test camera,OU=Test,O=SomeOrg"
    assert docs[-1]["signing"]["reason"] == "the stream ended before this GOP's signature came"
    assert status["signing"]["format"] == "onvif"


def _extradata_nals(path: Path) -> bytes:
    """The parameter sets of an MP4's avcC/hvcC record, as an Annex B byte stream (via FFmpeg's bitstream
    filter): the SPS/PPS (and VPS) the camera configured."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        name = "hevc_mp4toannexb" if video.codec_context.name == "hevc" else "h264_mp4toannexb"
        bsf = av.BitStreamFilterContext(name, video)
        for packet in container.demux(video):
            if packet.size and packet.is_keyframe:
                return b"".join(bytes(p) for p in bsf.filter(packet))
    return b""


def test_a_signed_camera_that_turns_invalid_raises_an_alarm(tmp_path: Path) -> None:
    served = camera_file("h264", tmp_path / "tampered.mp4", flip_in_gop=3)
    server = RtspServer(free_port(), replay=served, log=tmp_path / "rtsp.log").start()
    try:
        _, cfg = cameras_config(tmp_path, [camera("gate-tamper", rtsp=server.url)])
        cfg = cfg.model_copy(update={"evidence": cfg.evidence.model_copy(
            update={"camera_signing_ca": SAMPLES / "ca.pem"})})   # the global trust anchor
        agent = build_agent(cfg)
        agent.start()
        try:
            wait_for(lambda: agent.catalog.query(
                "SELECT kind FROM alarms WHERE key = 'camera.gate-tamper.signature_invalid'"),
                timeout=40, what="the signature alarm")
            # The GOP after the tampered one verifies again: the alarm is cleared by its segment.
            def valid_again() -> list | None:
                segments = sealed_segments(agent.catalog, "gate-tamper")
                signed = [manifest(cfg.agent.data_dir, x.file_id)["signed"] for x in segments]
                return segments if f"{INVALID} {VALID}" in " ".join(signed) else None

            segments = wait_for(valid_again, timeout=30, what="a valid segment after the invalid one")
            alarm = agent.catalog.query(
                "SELECT kind, message, cleared_ms FROM alarms WHERE key = 'camera.gate-tamper.signature_invalid'")
            status = agent.cameras.camera_status()[0]
        finally:
            agent.stop()
    finally:
        server.stop()
    # The segments before the tampered GOP (the third of the recording) verify; its own does not.
    docs = [manifest(cfg.agent.data_dir, s.file_id) for s in segments]
    bad = next(i for i, d in enumerate(docs) if d["signed"] == INVALID)
    assert bad >= 1 and all(d["signed"] == VALID for d in docs[:bad])
    assert docs[bad]["signing"]["reason"] == "NAL unit(s) [10] of the GOP differ from what the camera signed"
    assert alarm[0][0] == "camera_signature_invalid" and "no longer verifies" in alarm[0][1]
    assert alarm[0][2] is not None
    assert status["signing"]["format"] == "onvif"


def test_a_camera_that_starts_signing_mid_stream_is_checked_from_its_next_gop() -> None:
    """After a few unsigned GOPs the checker stops hashing (an unsigned camera costs next to nothing); a
    signing SEI turns it back on at the next GOP, whose signature then verifies."""
    checker = GopChecker(False, anchors())
    for nal in [*sample_nals("h264", signed=False), *sample_nals("h264")]:
        checker.feed(nal, 0)
    checker.finish()
    statuses = [r.status for r in checker.results(0)]
    # 5 unsigned GOPs; the signed recording's first two GOPs began before its first SEI (not hashed); the SEI
    # that signs the second of them is passed over; the next two GOPs verify; the last one's SEI never comes.
    assert statuses == [UNSIGNED] * 5 + [UNVERIFIABLE] * 2 + [VALID] * 2 + ["unchecked"]


def test_a_camera_configured_to_sign_that_sends_unsigned_video_raises_the_alarm(tmp_path: Path) -> None:
    server = RtspServer(free_port(), log=tmp_path / "rtsp.log").start()   # x264: no signing SEI
    try:
        _, cfg = cameras_config(tmp_path, [camera("gate-plain", rtsp=server.url, signing_ca=str(SAMPLES / "ca.pem"))])
        agent = build_agent(cfg)
        agent.start()
        try:
            alarm = wait_for(lambda: agent.catalog.query(
                "SELECT kind, message FROM alarms WHERE key = 'camera.gate-plain.signature_invalid' "
                "AND cleared_ms IS NULL"), timeout=40, what="the signature alarm")
            segment = wait_for(lambda: sealed_segments(agent.catalog, "gate-plain"), timeout=30, what="a segment")[0]
        finally:
            agent.stop()
    finally:
        server.stop()
    doc = manifest(cfg.agent.data_dir, segment.file_id)
    assert doc["signed"] == UNSIGNED and doc["signing"]["gops"] >= 1 and "format" not in doc["signing"]
    assert alarm[0][0] == "camera_signature_invalid" and "unsigned" in alarm[0][1]


def test_a_segment_cut_by_kill9_is_checked_from_its_file(tmp_path: Path) -> None:
    """The segment a crash cut is taken in at the next start; its verdict comes from the file alone: the GOPs
    whose SEI is in the file verify, the last one's SEI (in the next segment, never written) is unchecked."""
    served = camera_file("h264", tmp_path / "camera.mp4")
    server = RtspServer(free_port(), replay=served, log=tmp_path / "rtsp.log").start()
    try:
        config_path, cfg = cameras_config(tmp_path, [camera("yard-signed", rtsp=server.url, segment_s=30,
                                                             signing_ca=str(SAMPLES / "ca.pem"))])
        spool = spool_dir(cfg.agent.data_dir, "yard-signed")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(tmp_path / "agent.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "--config", str(config_path), "run"],
                                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            # Two keyframes (about 45 kB each) and the SEI after the second: more than 110 kB.
            cut = wait_for(lambda: next((p for p in spool.glob("*.mkv") if p.stat().st_size > 110_000), None),
                           timeout=40, what="a segment being written")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finally:
        server.stop()
    agent = build_agent(cfg)
    agent.start()
    try:
        segment = wait_for(lambda: next((s for s in sealed_segments(agent.catalog, "yard-signed")
                                         if s.original_path.endswith(cut.name)), None),
                           timeout=30, what="the cut segment sealed")
    finally:
        agent.stop()
    doc = manifest(cfg.agent.data_dir, segment.file_id)
    assert doc["signed"] == VALID, doc["signing"]
    assert doc["signing"]["gops_valid"] >= 1 and doc["signing"]["gops_unchecked"] == 1
