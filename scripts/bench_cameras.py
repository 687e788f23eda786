#!/usr/bin/env python3
"""Camera recording cost and load, against `ffmpeg -map 0 -c copy -f segment` on the same stream, in one run.

A GStreamer RTSP server (tests/peers/rtsp_server.py; one shared H.264 encoder, so every client gets the
same stream and the server's cost does not grow with clients), with an audio track per `--audio` variant
(none, pcmu, aac, ...), feeds:

  cpu       our recorder (drivers/rtsp.RtspRecorder: every track remuxed into Matroska segments, G.711 as
            16-bit PCM, the signed-video checker on every video packet, fsync at every keyframe, one
            keyframe decoded for image checks every `--image-check-s`) for K streams in one process
            (`--per-process N`: in processes of N recorders each), and
            K `ffmpeg -rtsp_transport tcp -i URL -map 0 -c copy -f segment` processes (G.711: `-c:a
            pcm_s16le`, as ours), side by side for `--cpu-s` seconds. CPU seconds per stream per second of
            each (psutil, user+system, after a warm-up) and our ratio (goal <= 1.2x). `--rounds` rounds,
            interleaved over the audio variants (a fresh server each); the median ratio per variant.
  load      the whole camera stage of the daemon (build_agent with N cameras: recorder, image checks,
            segment intake with copy + SHA-256 + read-back + signed manifest + catalog) for
            `--duration` seconds, on the last audio variant. Gaps must be 0; prints segments sealed, CPU
            of the agent per stream.

    .venv/bin/python scripts/bench_cameras.py [--streams 16] [--duration 300] [--cpu-streams 4] [--cpu-s 30]
        [--audio none pcmu aac] [--rounds 3] [--skip-load] [--against /path/to/another/worktree] [--per-process N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers.mosquitto import free_port  # noqa: E402
from tests.peers.rtsp_server import RtspServer  # noqa: E402

RECORDER_PROCESS = """
import sys, threading, time
sys.path.insert(0, {root!r})
from pathlib import Path
from drivers.image_checks import KeyframeSampler
from drivers.rtsp import RtspRecorder

class Listener:
    def __init__(self, every):
        self.sampler = KeyframeSampler(every)
    def connected(self, *a): pass
    def resumed(self, *a): pass
    def interrupted(self, camera, cause, since, detail): print("GAP", camera, cause, detail, flush=True)
    def clock_stepped(self, *a): pass
    def segment_done(self, segment): pass
    def packet(self, camera, packet, stream, key): self.sampler.offer(packet, stream, key)

urls = {urls!r}
recorders = [RtspRecorder(f"cam{{i}}", lambda u=urls[i % len(urls)]: u, Path({out!r}) / f"cam{{i}}",
                          Listener({every}), segment_s={segment_s}, stall_timeout_s=10) for i in range({k})]
threads = [threading.Thread(target=r.run) for r in recorders]
for t in threads: t.start()
print("READY", flush=True)
sys.stdin.readline()
for r in recorders: r.stop()
for t in threads: t.join()
"""


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        times = proc.cpu_times()
        total += times.user + times.system
    return total


def context_switches(procs: list[psutil.Process]) -> int:
    """Context switches (voluntary and not) of every thread of the processes, as counted so far (a thread that
    ended is no longer counted: compare processes whose threads live through the measurement)."""
    total = 0
    for proc in procs:
        for status in Path(f"/proc/{proc.pid}/task").glob("*/status"):
            try:
                lines = status.read_text().splitlines()
            except OSError:
                continue   # the thread ended meanwhile
            total += sum(int(line.split()[1]) for line in lines if "ctxt_switches:" in line)
    return total


def ffmpeg_command(url: str, audio: str, segment_s: int, pattern: str) -> list[str]:
    """`ffmpeg -c copy -map 0` into Matroska segments: every track, as we keep them. G.711 the Matroska
    muxer refuses, so for it FFmpeg writes 16-bit PCM (`-c:a pcm_s16le`), the same transform as ours."""
    codecs = ["-c", "copy"] + (["-c:a", "pcm_s16le"] if audio in ("pcmu", "pcma") else [])
    return ["ffmpeg", "-nostdin", "-loglevel", "error", "-rtsp_transport", "tcp", "-i", url, "-map", "0", *codecs,
            "-f", "segment", "-segment_time", str(segment_s), "-reset_timestamps", "1", pattern]


def recorder_process(root: Path, urls: list[str], out: Path, every: float, segment_s: int,
                     k: int) -> subprocess.Popen[str]:
    """K recorders of the tree at `root` in one process, started and READY; recorder i pulls urls[i % len]."""
    script = RECORDER_PROCESS.format(root=str(root), urls=urls, out=str(out), every=every, segment_s=segment_s, k=k)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "READY"
    return proc


def warm_up(url: str) -> None:
    """One probe before the round's clients: the server builds its shared media for it, so that eight clients
    arriving together do not race its preparation (GStreamer's server once refused every client after that)."""
    subprocess.run(["ffprobe", "-v", "error", "-rtsp_transport", "tcp", "-i", url], timeout=30, check=False,
                   stdout=subprocess.DEVNULL)


def bench_cpu(urls: list[str], k: int, seconds: float, segment_s: int, every: float, workdir: Path,
              audio: str = "none", against: Path | None = None, against_first: bool = False,
              per_process: int | None = None) -> dict[str, float]:
    """One round: K streams recorded by our process and by K ffmpeg processes side by side; with `against`
    (another work tree, e.g. main's), K more by that tree's recorder in a process of its own, started first
    when `against_first` (rounds alternate: the second process of a pair tends to measure a little higher).
    `per_process`: our K streams in processes of that many recorders each (default: all K in one). `urls`: one
    server for all (every client gets each frame at the same instant), or one per camera (stream i of every side
    from urls[i]: cameras whose frames come at their own moments, as independent cameras' do)."""
    ours_dir, ff_dir, other_dir = workdir / "ours", workdir / "ffmpeg", workdir / "against"
    ff_dir.mkdir(parents=True)
    other = None
    if against is not None and against_first:
        other = recorder_process(against, urls, other_dir, every, segment_s, k)
    per = per_process or k
    ours_all = [recorder_process(ROOT, urls[i:] + urls[:i], ours_dir / f"p{i}", every, segment_s, min(per, k - i))
                for i in range(0, k, per)]
    ours = ours_all[0]
    if against is not None and not against_first:
        other = recorder_process(against, urls, other_dir, every, segment_s, k)
    assert ours.stdin is not None
    ffmpeg = [subprocess.Popen(ffmpeg_command(urls[i % len(urls)], audio, segment_s, str(ff_dir / f"s{i}-%05d.mkv")))
              for i in range(k)]
    time.sleep(5)   # warm-up: connections, probing, imports
    mine, theirs = [psutil.Process(p.pid) for p in ours_all], [psutil.Process(p.pid) for p in ffmpeg]
    others = [psutil.Process(other.pid)] if other is not None else []
    x0 = [context_switches(side) for side in (mine, theirs, others)]
    c0, f0, o0, t0 = cpu_seconds(mine), cpu_seconds(theirs), cpu_seconds(others), time.monotonic()
    time.sleep(seconds)
    c1, f1, o1, t1 = cpu_seconds(mine), cpu_seconds(theirs), cpu_seconds(others), time.monotonic()
    x1 = [context_switches(side) for side in (mine, theirs, others)]
    for proc in (*ours_all, other):
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
    for proc in (*ours_all, other):
        if proc is not None:
            proc.wait(30)
    for proc in ffmpeg:
        proc.terminate()
        proc.wait(10)
    elapsed = t1 - t0
    ours_per = (c1 - c0) / elapsed / k
    ff_per = (f1 - f0) / elapsed / k
    result = {"streams": k, "audio": audio, "seconds": round(elapsed, 1),
              "ours_cpu_per_stream_pct": round(ours_per * 100, 3), "ffmpeg_cpu_per_stream_pct": round(ff_per * 100, 3),
              "ratio": round(ours_per / ff_per, 3),
              # context switches per stream per second: each is a thread that slept (data, the GIL, a lock) or
              # was preempted; a wake-up costs more on an idle machine than on a busy one
              "ours_switches_per_stream_s": round((x1[0] - x0[0]) / elapsed / k, 1),
              "ffmpeg_switches_per_stream_s": round((x1[1] - x0[1]) / elapsed / k, 1),
              "ours_bytes": sum(f.stat().st_size for f in ours_dir.rglob("*.mkv")),
              "ffmpeg_bytes": sum(f.stat().st_size for f in ff_dir.rglob("*.mkv")),
              "load_1min": round(os.getloadavg()[0], 2)}
    if other is not None:
        other_per = (o1 - o0) / elapsed / k
        result.update(against_cpu_per_stream_pct=round(other_per * 100, 3),
                      against_switches_per_stream_s=round((x1[2] - x0[2]) / elapsed / k, 1),
                      against_ratio=round(ours_per / other_per, 3),
                      against_vs_ffmpeg=round(other_per / ff_per, 3), against_first=against_first,
                      against_bytes=sum(f.stat().st_size for f in other_dir.rglob("*.mkv")))
    return result


def bench_cpu_rounds(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    """Rounds interleaved over the audio variants (the machine is shared: a burst of someone else's load
    hits every variant alike); per variant, the median of its rounds' ratios."""
    rounds: dict[str, list[dict[str, float]]] = {audio: [] for audio in args.audio}
    for n in range(args.rounds):
        for audio in args.audio:
            servers = [RtspServer(free_port(), "normal", width=args.width, height=args.height,
                                  bitrate_kbps=args.bitrate_kbps, audio=audio)
                       for _ in range(args.cpu_streams if args.independent else 1)]
            try:
                for server in servers:
                    server.start()
                    warm_up(server.url)
                result = bench_cpu([server.url for server in servers], args.cpu_streams, args.cpu_s, args.segment_s,
                                   args.image_check_s,
                                   workdir / f"cpu-{audio}-{n}", audio, args.against, against_first=n % 2 == 1,
                                   per_process=args.per_process)
            finally:
                for server in servers:
                    server.stop()
                shutil.rmtree(workdir / f"cpu-{audio}-{n}", ignore_errors=True)
            rounds[audio].append(result)
            print(f"cpu round {n + 1}/{args.rounds} audio={audio}: ours {result['ours_cpu_per_stream_pct']}% "
                  f"ffmpeg {result['ffmpeg_cpu_per_stream_pct']}% ratio {result['ratio']}x "
                  f"load {result['load_1min']}; switches/stream/s ours {result['ours_switches_per_stream_s']} "
                  f"ffmpeg {result['ffmpeg_switches_per_stream_s']}"
                  + (f" against {result['against_switches_per_stream_s']}" if args.against else "")
                  + (f"; against {result['against_cpu_per_stream_pct']}% "
                                                    f"(vs ffmpeg {result['against_vs_ffmpeg']}x), ours/against "
                                                    f"{result['against_ratio']}x" if args.against else ""), flush=True)
    summary: dict[str, object] = {}
    for audio, results in rounds.items():
        summary[audio] = {
            "rounds": results,
            "median_ratio": round(statistics.median(r["ratio"] for r in results), 3),
            "median_ours_pct": round(statistics.median(r["ours_cpu_per_stream_pct"] for r in results), 3),
            "median_ffmpeg_pct": round(statistics.median(r["ffmpeg_cpu_per_stream_pct"] for r in results), 3)}
        if args.against:
            summary[audio]["median_against_ratio"] = round(statistics.median(r["against_ratio"] for r in results), 3)
            summary[audio]["median_against_vs_ffmpeg"] = round(
                statistics.median(r["against_vs_ffmpeg"] for r in results), 3)
    return summary


def bench_load(url: str, n: int, seconds: float, segment_s: int, workdir: Path) -> dict[str, object]:
    from edge_agent.daemon import build_agent
    from tests.helpers import agent_config

    workdir.mkdir(parents=True, exist_ok=True)
    cameras = [{"name": f"cam{i:02d}", "rtsp": url, "segment_s": segment_s, "stall_timeout_s": 10,
                "location": f"路口 {i}", "location_kind": "intersection"} for i in range(n)]
    _, cfg = agent_config(workdir, cameras=cameras, agent={"min_free_mb": 512})
    agent = build_agent(cfg)
    me = psutil.Process()
    agent.start()
    time.sleep(5)
    c0, t0 = cpu_seconds([me]), time.monotonic()
    rss_peak = 0
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        rss_peak = max(rss_peak, me.memory_info().rss)
    c1, t1 = cpu_seconds([me]), time.monotonic()
    status = agent.cameras.camera_status()
    agent.stop()
    gaps = agent_gaps(cfg.catalog_path)
    sealed = sealed_count(cfg.catalog_path)
    return {"streams": n, "seconds": round(t1 - t0, 1), "gaps": gaps, "segments_sealed": sealed,
            "agent_cpu_pct": round((c1 - c0) / (t1 - t0) * 100, 1),
            "agent_cpu_per_stream_pct": round((c1 - c0) / (t1 - t0) / n * 100, 3),
            "connected_at_end": sum(1 for s in status if s["connected"]),
            "fps_min": min(s["fps"] for s in status), "rss_peak_mb": round(rss_peak / 2**20, 1)}


def agent_gaps(catalog: Path) -> list[dict[str, object]]:
    import sqlite3

    with sqlite3.connect(catalog) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM gaps")]


def sealed_count(catalog: Path) -> int:
    import sqlite3

    with sqlite3.connect(catalog) as conn:
        return conn.execute("SELECT COUNT(*) FROM files WHERE kind = 'camera' AND state = 'sealed'").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16, help="simultaneous cameras in the load run")
    parser.add_argument("--duration", type=float, default=300, help="seconds of the load run")
    parser.add_argument("--cpu-streams", type=int, default=4, help="streams per side in the CPU comparison")
    parser.add_argument("--cpu-s", type=float, default=30, help="seconds of the CPU comparison")
    parser.add_argument("--segment-s", type=int, default=10)
    parser.add_argument("--image-check-s", type=float, default=5)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--bitrate-kbps", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--audio", nargs="+", default=["none", "pcmu", "aac"],
                        choices=["none", "pcmu", "pcma", "aac", "opus"],
                        help="audio tracks to compare, one variant each (the load run uses the last)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per audio variant (median)")
    parser.add_argument("--against", type=Path, default=None,
                        help="another work tree (e.g. main's): its recorder runs too, side by side on the same server; "
                             "prints ours/against per round (starting order alternated)")
    parser.add_argument("--independent", action="store_true",
                        help="one RTSP server per camera (frames at each camera's own moments, as in the field) "
                             "instead of one server whose every client gets each frame at the same instant")
    parser.add_argument("--per-process", type=int, default=None,
                        help="our recorders per process in the CPU comparison (default: all in one process)")
    args = parser.parse_args()
    if not shutil.which("ffmpeg"):
        sys.exit("ffmpeg is needed for the baseline: run scripts/setup.sh")
    workdir = Path(tempfile.mkdtemp(prefix="bench-cameras-", dir=args.dir))
    os.chmod(workdir, 0o750)
    try:
        cpu = bench_cpu_rounds(args, workdir)
        for audio, summary in cpu.items():
            print(f"cpu audio={audio}: {args.cpu_streams} streams {args.width}x{args.height} {args.bitrate_kbps} "
                  f"kbit/s, {args.rounds} rounds of {args.cpu_s} s: median ours {summary['median_ours_pct']}% of "
                  f"a core per stream, ffmpeg -map 0 -c copy -f segment {summary['median_ffmpeg_pct']}%, "
                  f"median ratio {summary['median_ratio']}x (goal <= 1.2x)"
                  + (f"; ours/against median {summary['median_against_ratio']}x, against/ffmpeg "
                     f"{summary['median_against_vs_ffmpeg']}x" if args.against else ""))
        result: dict[str, object] = {"cpu": cpu}
        if not args.skip_load:
            server = RtspServer(free_port(), "normal", width=args.width, height=args.height,
                                bitrate_kbps=args.bitrate_kbps, audio=args.audio[-1]).start()
            try:
                load = bench_load(server.url, args.streams, args.duration, args.segment_s, workdir / "load")
            finally:
                server.stop()
            print(f"load: {load['streams']} streams for {load['seconds']} s: gaps {len(load['gaps'])} (goal 0), "
                  f"segments sealed {load['segments_sealed']}, agent CPU {load['agent_cpu_pct']}% of a core "
                  f"({load['agent_cpu_per_stream_pct']}% per stream), connected at end "
                  f"{load['connected_at_end']}/{load['streams']}, slowest {load['fps_min']} fps, "
                  f"peak RSS {load['rss_peak_mb']} MB")
            result["load"] = load
        print(json.dumps(result, default=str))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
