"""What checking camera signatures costs the recorder, per second of video.

The recorder remuxes each camera packet into Matroska; with camera-signed video it also splits the packet into
NAL units and hashes each one (drivers/media_signing.py), and verifies one signature per GOP. This measures both
on the same packets in the same run: the baseline is the remux alone (PyAV's Matroska muxer, as
drivers/rtsp.py does it), ours is the checker's work on top of it.

  .venv/bin/python scripts/bench_signing.py [--loops 20]

Streams: ONVIF's signed H.264 sample (../shared/testdata/onvif-media-signing, 320x180-ish, ~0.2 Mbit/s,
signatures verified), and a 1280x720 H.264 stream at about 4 Mbit/s made by ffmpeg's testsrc (unsigned: every
NAL unit still hashed, as for any camera until its first SEI). CPU time of this process (time.process_time).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from drivers.media_signing import GopChecker, length_prefixed, load_anchors, split_nals  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "onvif-media-signing"


def packets_of(path: Path) -> tuple[list[av.Packet], float, bool, bool, av.video.stream.VideoStream, av.Container]:
    container = av.open(str(path))
    video = container.streams.video[0]
    packets = [p for p in container.demux(video) if p.size]
    seconds = len(packets) / float(video.average_rate or 25)
    return packets, seconds, video.codec_context.name == "hevc", length_prefixed(video.codec_context.extradata), \
        video, container


def remux(packets: list[av.Packet], video: av.video.stream.VideoStream, out: Path, loops: int) -> float:
    start = time.process_time()
    for _ in range(loops):
        with av.open(str(out), "w", format="matroska") as mkv:
            stream = mkv.add_stream_from_template(video)
            for i, packet in enumerate(packets):
                copy = av.Packet(bytes(packet))
                copy.pts = copy.dts = i
                copy.time_base = video.time_base
                copy.stream = stream
                mkv.mux(copy)
    return time.process_time() - start


def check(packets: list[av.Packet], hevc: bool, prefixed: bool, anchors: list | None, loops: int,
          continuous: bool) -> tuple[float, str]:
    """`continuous`: one stream of `loops` times the packets (an unsigned camera's long connection); else a new
    connection per loop (the signed sample cannot be repeated within one: its GOP counter would jump back)."""
    start = time.process_time()
    verdicts = ""
    checker = GopChecker(hevc, anchors)
    for _ in range(loops):
        if not continuous:
            checker = GopChecker(hevc, anchors)
        for packet in packets:
            for nal in split_nals(bytes(packet), prefixed):
                checker.feed(nal, 0)
        if not continuous:
            checker.finish()
            verdicts = ",".join(sorted({r.status for r in checker.results(0)}))
            checker.forget(0)
    if continuous:
        checker.finish()
        verdicts = ",".join(sorted({r.status for r in checker.results(0)}))
    return time.process_time() - start, verdicts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", type=int, default=20)
    args = parser.parse_args()
    anchors = load_anchors((SAMPLES / "ca.pem").read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "720p.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=25", "-t", "10",
                        "-c:v", "libx264", "-preset", "ultrafast", "-b:v", "4M", "-g", "25", str(big)], check=True)
        for name, path, continuous in (("ONVIF signed sample (H.264)", SAMPLES / "test_signed_h264.mp4", False),
                                       ("720p H.264 4 Mbit/s (unsigned)", big, True)):
            packets, seconds, hevc, prefixed, video, container = packets_of(path)
            base = remux(packets, video, Path(tmp) / "out.mkv", args.loops)
            ours, verdicts = check(packets, hevc, prefixed, anchors, args.loops, continuous)
            container.close()
            video_s = seconds * args.loops
            print(f"{name}: {video_s:.0f} s of video, {sum(p.size for p in packets) * 8 / seconds / 1e6:.2f} Mbit/s; "
                  f"remux {base / video_s * 1000:.2f} ms CPU per video second, checker {ours / video_s * 1000:.2f} ms "
                  f"(+{ours / base * 100:.0f} % of the remux; {ours / video_s * 100:.3f} % of a core); "
                  f"GOP verdicts: {verdicts}")


if __name__ == "__main__":
    main()
