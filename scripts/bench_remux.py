#!/usr/bin/env python3
"""The camera recorder's CPU per packet without the network: one recording replayed as fast as it can be read.

`bench_cameras.py` measures live streams, where wake-ups, the server's timing and the other processes move every
figure by several percent. This replays one generated recording (H.264, optionally with audio) through:

- **ours**: `RtspRecorder`'s session as it runs for a camera (segments, a fsync per keyframe, timing, the signing
  checker, the listener), opened as the live path opens it (no PyAV read timeout; the stall watch has nothing to
  watch in a file);
- **bare**: a PyAV loop that demuxes and muxes into one Matroska file, nothing else (PyAV's own floor);
- **ffmpeg**: `ffmpeg -map 0 -c copy -f segment`, the baseline of `bench_cameras.py`, less its start-up (the same
  command on the first packet only).

Each in a process of its own, rounds alternated (the least of each side's rounds is the figure: writing
into page-cache pages the kernel must find anew costs several times more on these machines); CPU of the thread
that does the work (ours, bare) or of the child (ffmpeg), in microseconds per packet, and the ratios. The
repeatable figure for cutting the per-packet
path: a change to `drivers/rtsp.py` shows here in µs per packet before it shows in `bench_cameras.py`.

    .venv/bin/python scripts/bench_remux.py [--seconds 600] [--audio aac] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = r'''
import json, resource, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import av

def thread_cpu():
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime

src, out, mode = {src!r}, Path({out!r}), {mode!r}
if mode == "bare":
    started = thread_cpu()
    source = av.open(src)
    sink = av.open(str(out / "bare.mkv"), "w", format="matroska")
    streams = {{s.index: sink.add_stream_from_template(s) for s in source.streams}}
    packets = 0
    for packet in source.demux():
        if packet.dts is None:
            continue
        packet.stream = streams[packet.stream_index]
        sink.mux(packet)
        packets += 1
    sink.close()
    source.close()
    cpu = thread_cpu() - started
else:
    from drivers.rtsp import RtspRecorder

    class Recorder(RtspRecorder):
        def _open(self, url, host, port):
            return av.open(url, timeout=(10.0, None)), None   # the live path: no read timeout

    class Listener:
        def connected(self, *a): pass
        def resumed(self, *a): pass
        def interrupted(self, camera, cause, since, detail): raise SystemExit(f"interrupted: {{cause}} {{detail}}")
        def clock_stepped(self, *a): pass
        def segment_done(self, segment): pass
        def packet(self, *a): pass

    recorder = Recorder("replay", lambda: src, out / "spool", Listener(), segment_s=10, stall_timeout_s=10)
    started = thread_cpu()
    recorder._session()
    cpu = thread_cpu() - started
    packets = recorder.stats.packets + recorder.stats.audio_packets
print(json.dumps({{"cpu_s": cpu, "packets": packets}}))
'''

# audio track -> (its test source's sample rate, its codec); None: video only. No G.711: Matroska refuses it as it
# is, so the bare loop and `ffmpeg -c copy` could not take it (bench_cameras.py measures it live, transformed).
AUDIO = {"none": None, "aac": (48000, "aac")}


def make_source(path: Path, seconds: int, audio: str) -> None:
    """A camera-like recording: 640x360 at 25 fps, a keyframe a second, 1000 kbit/s (bench_cameras' stream), in
    MPEG-TS: its H.264 is in start-code form (Annex B) with parameter sets in band, as FFmpeg's RTSP demuxer gives
    a camera's, so the signing checker's and `_timed`'s start-code paths run as they do live (a Matroska source
    gives length-prefixed units, and skips them)."""
    track = AUDIO[audio]
    audio_in = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate={track[0]}"] if track else []
    audio_codec = ["-c:a", track[1]] if track else []
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25", *audio_in,
                    "-t", str(seconds), "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-g", "25",
                    "-b:v", "1000k", *audio_codec, "-f", "mpegts", str(path)],
                   check=True)


def run_python(mode: str, src: Path, out: Path) -> dict[str, float]:
    out.mkdir(parents=True)
    script = RUN.format(root=str(ROOT), src=str(src), out=str(out), mode=mode)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ffmpeg(src: Path, out: Path, first_only: bool = False) -> float:
    """CPU seconds of `ffmpeg -map 0 -c copy -f segment` over `src` (or its first packet: its start-up)."""
    out.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(src), "-map", "0", "-c", "copy",
                    *(["-frames:v", "1"] if first_only else []), "-f", "segment", "-segment_time", "10",
                    "-reset_timestamps", "1", str(out / "s-%05d.mkv")], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="length of the recording replayed")
    parser.add_argument("--audio", choices=sorted(AUDIO), default="none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if not shutil.which("ffmpeg"):
        sys.exit("ffmpeg is needed: run scripts/setup.sh")
    work = Path(tempfile.mkdtemp(prefix="bench-remux-", dir=args.dir))
    try:
        src = work / "source.ts"
        make_source(src, args.seconds, args.audio)
        rows = []
        for n in range(args.rounds):
            order = ("ours", "bare", "ffmpeg") if n % 2 == 0 else ("ffmpeg", "bare", "ours")
            row: dict[str, float] = {}
            for mode in order:
                if mode == "ffmpeg":
                    row["ffmpeg_s"] = run_ffmpeg(src, work / f"ff{n}") - run_ffmpeg(src, work / f"ff{n}-first", True)
                else:
                    result = run_python(mode, src, work / f"{mode}{n}")
                    row[f"{mode}_s"], row["packets"] = result["cpu_s"], result["packets"]
            per = {k[:-2]: row[k] / row["packets"] * 1e6 for k in ("ours_s", "bare_s", "ffmpeg_s")}
            rows.append(per)
            print(f"round {n + 1}/{args.rounds} ({', '.join(order)}): {int(row['packets'])} packets; µs per packet: "
                  f"ours {per['ours']:.1f}, bare PyAV {per['bare']:.1f}, ffmpeg {per['ffmpeg']:.1f}; ours/ffmpeg "
                  f"{per['ours'] / per['ffmpeg']:.2f}x, ours/bare {per['ours'] / per['bare']:.2f}x, bare/ffmpeg "
                  f"{per['bare'] / per['ffmpeg']:.2f}x; load {os.getloadavg()[0]:.2f}", flush=True)
        # A run that writes into pages the kernel must find anew costs several times one that reuses pages (this
        # VM, docs/BENCHMARKS.md "Ingest speed"): the least of the rounds is each side's undisturbed cost.
        summary = {}
        for name, pick in (("least", min), ("median", statistics.median)):
            at = summary[name] = {k: pick(r[k] for r in rows) for k in ("ours", "bare", "ffmpeg")}
            print(f"{name} µs per packet ({args.audio} audio, {args.seconds} s replayed): ours {at['ours']:.1f}, "
                  f"bare PyAV {at['bare']:.1f}, ffmpeg {at['ffmpeg']:.1f}; ours/ffmpeg "
                  f"{at['ours'] / at['ffmpeg']:.2f}x, ours/bare {at['ours'] / at['bare']:.2f}x")
        print(json.dumps({"audio": args.audio, "seconds": args.seconds, "rounds": rows, **summary}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
