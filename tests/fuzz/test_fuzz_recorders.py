"""Fuzzing what a docked recorder can put in front of the agent: file names, directory trees and identity
files. Whatever the volume holds, the walk never raises, never yields anything outside the volume or behind
a symlink, and every refusal carries a reason (G6)."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.ingest import probe_media
from edge_agent.sources.recorders import (
    MAX_NAME_BYTES,
    RefusedEntry,
    SourceFile,
    check_relative,
    identify_volume,
    load_models,
    parse_name,
    walk_volume,
)

MODELS = load_models()
TZ = ZoneInfo("Asia/Shanghai")

# Names as a FAT/exFAT recorder or a hostile stick can hold them: any byte but NUL and '/', as str with
# surrogateescape (what os.listdir returns for bytes that are not UTF-8).
raw_names = st.binary(min_size=1, max_size=300).filter(lambda b: b"\x00" not in b and b"/" not in b) \
    .map(os.fsdecode).filter(lambda n: n not in (".", ".."))
nice_names = st.from_regex(r"[A-Za-z0-9_\-.]{1,20}", fullmatch=True).filter(lambda n: n not in (".", ".."))
names = st.one_of(raw_names, nice_names, st.sampled_from(["..", ".", "DCIM", "A123456_320102123_20261122080000.MP4",
                                                          "20261122_080000_DHA1B2C3D4_320102123.mp4"]))


@given(st.text(max_size=400) | st.binary(max_size=400).map(os.fsdecode))
@settings(max_examples=400, deadline=None)
def test_check_relative_accepts_only_paths_that_stay_inside_the_volume(relative: str) -> None:
    problem = check_relative(relative)
    if problem is None:
        parts = PurePosixPath(relative).parts
        assert parts and not PurePosixPath(relative).is_absolute()
        assert ".." not in parts and "." not in parts
        assert all(ord(c) >= 0x20 and ord(c) != 0x7F for c in relative)
        assert all(len(p.encode("utf-8")) <= MAX_NAME_BYTES for p in parts)
        root = Path("/vol")
        assert (root / relative).resolve(strict=False).is_relative_to(root)
    else:
        assert isinstance(problem, str) and problem


@given(st.text(max_size=200) | st.binary(max_size=200).map(os.fsdecode), st.sampled_from(MODELS + [None]))
@settings(max_examples=300, deadline=None)
def test_recorder_file_names_never_break_name_parsing(name: str, model: object) -> None:
    parsed = parse_name(name, model, TZ)  # type: ignore[arg-type]
    assert parsed.start_ms is None or isinstance(parsed.start_ms, int)


# A tree: a list of entries, each a path of 1-4 names and a kind.
entry_kinds = st.sampled_from(["file", "dir", "symlink_out", "symlink_up", "symlink_file", "fifo", "deep"])
trees = st.lists(st.tuples(st.lists(names, min_size=1, max_size=4), entry_kinds), min_size=1, max_size=12)


def _build(volume: Path, outside: Path, tree: list[tuple[list[str], str]]) -> None:
    for parts, kind in tree:
        path = volume.joinpath(*parts)
        if os.path.lexists(path):
            continue  # the name is taken (writing to a FIFO made earlier would block forever)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "file":
                path.write_bytes(os.urandom(16))
            elif kind == "dir":
                path.mkdir(exist_ok=True)
            elif kind == "symlink_out":
                path.symlink_to(outside)
            elif kind == "symlink_up":
                path.symlink_to("../" * 8)
            elif kind == "symlink_file":
                path.symlink_to(outside / "secret.key")
            elif kind == "fifo":
                os.mkfifo(path)
            elif kind == "deep":
                path.joinpath(*["d"] * 20).mkdir(parents=True, exist_ok=True)
                path.joinpath(*["d"] * 20, "x.mp4").write_bytes(b"deep")
        except OSError:
            continue  # the tree cannot hold this entry (a name already used as a file, too long): skip it


@given(trees)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_walk_of_any_tree_yields_only_regular_files_inside_the_volume(tree: list[tuple[list[str], str]]) -> None:
    base = Path(tempfile.mkdtemp(prefix="fuzz-vol-"))
    try:
        volume, outside = base / "vol", base / "outside"
        volume.mkdir()
        outside.mkdir()
        (outside / "secret.key").write_bytes(b"not evidence")
        _build(volume, outside, tree)
        entries = list(walk_volume(volume))
        real_root = volume.resolve()
        for entry in entries:
            if isinstance(entry, SourceFile):
                assert check_relative(entry.relative) is None
                st_ = os.lstat(entry.path)
                assert stat.S_ISREG(st_.st_mode)
                assert entry.path.resolve().is_relative_to(real_root)
                assert all(not p.is_symlink() for p in [entry.path, *entry.path.parents] if p != base
                           and p.is_relative_to(volume))
            else:
                assert isinstance(entry, RefusedEntry) and entry.reason
        taken = {e.relative for e in entries if isinstance(e, SourceFile)}
        assert len(taken) == len([e for e in entries if isinstance(e, SourceFile)])  # no file twice
        # Identification of the same volume never raises either.
        identify_volume(volume, "FUZZ", MODELS, sample_names=[Path(t).name for t in taken], tz=TZ)
    finally:
        shutil.rmtree(base)


@given(st.binary(max_size=2048), st.sampled_from([m for m in MODELS if m.identity_file]))
@settings(max_examples=200, deadline=None)
def test_any_identity_file_content_identifies_or_falls_back_without_raising(content: bytes, model: object) -> None:
    base = Path(tempfile.mkdtemp(prefix="fuzz-id-"))
    try:
        (base / model.identity_file).write_bytes(content)  # type: ignore[attr-defined]
        ident, _ = identify_volume(base, "LABEL", [model], model_name=model.name, tz=TZ)  # type: ignore[list-item]
        assert ident.device_id and ident.method in ("identity_file", "unknown")
    finally:
        shutil.rmtree(base)


# Container signatures FFmpeg recognises, so that random bodies reach the demuxers and their stream parsers.
MAGIC = [b"", b"\xac\x40", b"\x00\x00\x00\x18ftypmp42", b"ID3\x03\x00", b"RIFF\x00\x00\x00\x00AVI ",
         b"\x00\x00\x01\xba", b"\x1a\x45\xdf\xa3", b"\xff\xf1", b"OggS\x00", b"fLaC", b"\x47\x40\x00\x10"]


@given(st.sampled_from(MAGIC), st.binary(max_size=40_000), st.sampled_from([".mp4", ".mov", ".wav", ".avi"]))
@settings(max_examples=80, deadline=None)
def test_any_recorder_file_content_is_probed_without_raising(magic: bytes, body: bytes, suffix: str) -> None:
    """probe_media runs on every copy before it is recorded: if it raised, the dock worker would die (an AC-4
    sync word at the start of random bytes did, in the crash suite)."""
    base = Path(tempfile.mkdtemp(prefix="fuzz-media-"))
    try:
        path = base / f"REC{suffix}"
        path.write_bytes(magic + body)
        media = probe_media(path)
        assert media["container"] == suffix[1:]
    finally:
        shutil.rmtree(base)


def test_ac4_sync_word_then_random_bytes_is_probed_without_raising(tmp_path: Path) -> None:
    path = tmp_path / "REC.MP4"
    path.write_bytes(b"\xac\x40" + random.Random(6).randbytes(65534))
    assert probe_media(path)["container"] == "mp4"


@given(st.sampled_from([b"\xff\xd8\xff\xe1", b"\xff\xd8\xff\xc0\x00", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", b""]),
       st.binary(max_size=4_000), st.sampled_from([".jpg", ".JPEG", ".png"]))
@settings(max_examples=120, deadline=None)
def test_any_still_image_header_is_probed_without_raising(magic: bytes, body: bytes, suffix: str) -> None:
    """Still images are read from their header, not through FFmpeg: a truncated or hostile header is a
    probe_error, never an exception (a JPEG segment length pointing past the end, a zero size)."""
    base = Path(tempfile.mkdtemp(prefix="fuzz-still-"))
    try:
        path = base / f"IMG{suffix}"
        path.write_bytes(magic + body)
        media = probe_media(path)
        assert media["container"] == suffix[1:].lower()
        assert ("probe_error" in media) != ("width" in media)
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("suffix,codec", [(".jpg", "mjpeg"), (".png", "png")])
def test_a_still_image_is_probed_from_its_header_with_codec_and_size_and_no_duration(
        tmp_path: Path, suffix: str, codec: str) -> None:
    path = tmp_path / f"IMG_0001{suffix}"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=352x288", "-frames:v", "1",
                    "-metadata", "comment=exif-like segment before the frame", str(path)], check=True)
    assert probe_media(path) == {"container": suffix[1:], "codec": codec, "width": 352, "height": 288}
