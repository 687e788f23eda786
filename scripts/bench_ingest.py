#!/usr/bin/env python3
"""Ingest throughput of the real daemon against `cp`+`sync` and `cp`+`sha256sum`, in one run.

A simulated dock of N recorders (directory dock; each recorder a volume of
several files) is written once. Then, with the page cache of the sources
dropped before each run:

  ours          `edge-agent run` ingests every volume: copy + SHA-256 in one pass,
                fsync, read-back with the cache dropped, rename, signed manifest,
                catalog row (timed from docking until the last file is sealed)
  cp+sync      `cp -r` of the same volumes, then `sync`
  cp+sha256sum `cp -r`, then `sha256sum` of every copy

Prints MB/s of each and our ratio to each baseline, and the daemon's peak RSS
(psutil, sampled every 20 ms). Goal: >= 0.5x cp+sync, >= 1.5x cp+sha256sum,
peak RSS < 200 MB.

    .venv/bin/python scripts/bench_ingest.py [--gib 2] [--recorders 8] [--files 4] [--dir /var/tmp]
        [--encrypt sm4-gcm,aes-256-gcm]

With --encrypt: each round also runs ours with `[store] encrypt = ALG` for each algorithm listed (encryption at
rest, edge_agent/atrest.py), right after the default (plaintext store), and prints each one's MB/s, CPU s and
ratio to the default of the same round.

With --suite ed25519+sm2 (or sm2): each round also runs ours with `[crypto] suite` set so (SM3 beside SHA-256
in the copy's one pass, SM2 signatures beside or instead of Ed25519), right after the default run on the same
files; prints both and their ratio (`suite_vs_default`). With --small too.

With --against TREE (another checkout with its own .venv, e.g. main in a worktree): each round times cp+sync,
this tree's ingest and TREE's (order alternating), then cp+sync again, on the same dock; prints each ingest's
speed against the mean of the two cp+sync (on a VM a cp+sync right after another is 2x faster than one after an
ingest, docs/BENCHMARKS.md "Ingest speed"), both trees' CPU-s per GiB and their speed ratio.

With --small: a card of many small files (a day of photos: --count 2000 files of --kib 20 by default)
through `edge-agent import` (copy, hash, read-back, manifest, catalog rows, in batches), against
`cp -r` + `sync` of the same card in the same run; prints files/s of each and the ratio. Goal >= 500
files/s for 20 KB files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"
MIB = 1 << 20


def drop_caches(files: list[Path]) -> str:
    """Make the next read of the sources come from disk. Returns how it was done."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


def make_dock(parked: Path, recorders: int, files: int, total: int) -> list[Path]:
    """N recorder volumes of ZFY-GA-2016 recorders; incompressible content, written once."""
    size = total // (recorders * files)
    pattern = os.urandom(64 * MIB)
    out: list[Path] = []
    for r in range(recorders):
        device = f"A{100000 + r}"
        volume = parked / device
        (volume / "DCIM/100").mkdir(parents=True)
        (volume / "DEVICE.INI").write_text(f"DeviceID={device}\nPoliceID=32010200{r}\nSerialNo=SN{r:04d}\n")
        for f in range(files):
            path = volume / f"DCIM/100/{device}_32010200{r}_2026112208{f:02d}00.MP4"
            with open(path, "wb") as fh:
                # Framed as a recorder's MP4 (ftyp, then one large mdat), so probing reads box headers
                # rather than scanning random bytes for a container; the payload is incompressible.
                fh.write(struct.pack(">I4s4sI8s", 24, b"ftyp", b"isom", 0x200, b"isomavc1"))
                fh.write(struct.pack(">I4sQ", 1, b"mdat", size - 24))
                left, offset = size - 40, (r * files + f) * 4096
                while left:
                    block = memoryview(pattern)[offset % (32 * MIB):][: min(left, 32 * MIB)]
                    fh.write(block)
                    left -= len(block)
                    offset += 7919
            past = time.time() - 3600
            os.utime(path, (past, past))
            out.append(path)
    return out


def write_config(work: Path, dock_root: Path, extra: str = "") -> Path:
    data = work / "data"
    data.mkdir(mode=0o750)
    config = work / "agent.toml"
    config.write_text(
        '[agent]\nid = "bench-01"\nsite = "bench"\nunit = "bench"\n'
        f'data_dir = "{data}"\nmax_disk_gb = 1000\nmin_free_mb = 0\n\n'
        # Nothing listens on this port: the uplink stays offline, so the run measures ingest alone.
        f'[mqtt]\nhost = "127.0.0.1"\nport = {closed_port()}\n\n'
        f'[[docks]]\nname = "bench"\nkind = "directory"\nroot = "{dock_root}"\nsettle_s = 0\nrescan_s = 0.2\n'
        + extra, encoding="utf-8")
    return config


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sealed(catalog: Path) -> int:
    if not catalog.exists():
        return 0
    conn = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM files WHERE state NOT IN ('discovered', 'staged')").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def started(catalog: Path) -> bool:
    if not catalog.exists():
        return False
    conn = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT 1 FROM audit WHERE action = 'agent.started'").fetchone() is not None
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def encrypted_store(work: Path, algorithm: str) -> str:
    """The `[store]` section that encrypts the store with `algorithm`, its key made as docs/OPERATIONS.md says."""
    key = work / "store.key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    return f'\n[store]\nencrypt = "{algorithm}"\nkey_file = "{key}"\n'


def crypto_suite(suite: str) -> str:
    """The `[crypto]` section that signs under `suite`."""
    return f'\n[crypto]\nsuite = "{suite}"\n'


def run_ours(work: Path, parked: Path, sources: list[Path], extra: str = "",
             agent: Path | None = None) -> tuple[float, int, str, float]:
    """`agent`: another tree's `edge-agent` (--against); this tree's by default."""
    dock_root = work / "dock"
    dock_root.mkdir()
    config = write_config(work, dock_root, extra)
    catalog = work / "data" / "catalog.sqlite"
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen([str(agent or EDGE_AGENT), "--config", str(config), "run"], stdout=log, stderr=log)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        watched = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], watched.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        while not started(catalog):
            if proc.poll() is not None:
                raise SystemExit(f"edge-agent exited: see {work / 'daemon.log'}")
            time.sleep(0.05)
        how = drop_caches(sources)
        startup = psutil.Process(proc.pid).cpu_times()   # the daemon's start (imports, keys) is not ingest
        t0 = time.monotonic()
        for volume in sorted(parked.iterdir()):
            os.rename(volume, dock_root / volume.name)       # every recorder docks at once
        while sealed(catalog) < len(sources):
            if proc.poll() is not None:
                raise SystemExit(f"edge-agent exited: see {work / 'daemon.log'}")
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = psutil.Process(proc.pid).cpu_times()
        cpu_s = (cpu.user - startup.user) + (cpu.system - startup.system)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stop.set()
        sampler.join()
        log.close()
    for volume in sorted(dock_root.iterdir()):
        os.rename(volume, parked / volume.name)
    return elapsed, peak[0], how, cpu_s


def run_shell(parked: Path, dest: Path, sources: list[Path], then: list[str]) -> tuple[float, float]:
    drop_caches(sources)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", str(parked), str(dest)], check=True)
    if then == ["sync"]:
        subprocess.run(["sync"], check=True)
    else:
        copies = sorted(str(p) for p in dest.rglob("*.MP4"))
        subprocess.run([*then, *copies], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(dest)
    subprocess.run(["sync"], check=True)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def encrypted_runs(work: Path, parked: Path, sources: list[Path], nbytes: int, algorithms: list[str],
                   plain_s: float) -> dict:
    """Ours with the store encrypted by each of `algorithms`, after the default run of the same round."""
    out = {}
    for algorithm in algorithms:
        enc_dir = work / f"ours-{algorithm}"
        enc_dir.mkdir()
        seconds, peak_rss, _how, cpu_s = run_ours(enc_dir, parked, sources, encrypted_store(enc_dir, algorithm))
        shutil.rmtree(enc_dir)
        subprocess.run(["sync"], check=True)
        out[algorithm] = {"mb_s": round(nbytes / 1e6 / seconds, 1), "ratio_vs_plain": round(plain_s / seconds, 2),
                          "cpu_s": round(cpu_s, 2), "peak_rss_mb": round(peak_rss / 1e6, 1)}
    return out


def one_round(work: Path, parked: Path, sources: list[Path], nbytes: int, encrypt: list[str] | None = None,
              suite: str | None = None) -> dict:
    """cp+sync, cp+sha256sum and ours on the same files, back to back; each with cold source caches. With
    `encrypt`, ours again with the store encrypted by each algorithm listed; with `suite`, ours again
    signing under that [crypto] suite."""
    load = os.getloadavg()[0]
    cp_sync, cp_sync_cpu = run_shell(parked, work / "cp-sync", sources, ["sync"])
    cp_sha, cp_sha_cpu = run_shell(parked, work / "cp-sha", sources, ["sha256sum"])
    ours_dir = work / "ours"
    ours_dir.mkdir()
    ours, peak_rss, how, ours_cpu = run_ours(ours_dir, parked, sources)
    shutil.rmtree(ours_dir)
    subprocess.run(["sync"], check=True)
    mbs = {"ours": nbytes / 1e6 / ours, "cp_sync": nbytes / 1e6 / cp_sync, "cp_sha256sum": nbytes / 1e6 / cp_sha}
    suited = {}
    if suite is not None:
        ours_dir.mkdir()
        took, suite_rss, _how, suite_cpu = run_ours(ours_dir, parked, sources, crypto_suite(suite))
        shutil.rmtree(ours_dir)
        subprocess.run(["sync"], check=True)
        suited = {"suite": suite, "suite_mb_s": round(nbytes / 1e6 / took, 1), "suite_cpu_s": round(suite_cpu, 2),
                  "suite_peak_rss_mb": round(suite_rss / 1e6, 1), "suite_vs_default": round(ours / took, 3)}
    encrypted = encrypted_runs(work, parked, sources, nbytes, encrypt, ours) if encrypt else {}
    return {
        **suited,
        **({"encrypted": encrypted} if encrypted else {}),
        "mb_s": {k: round(v, 1) for k, v in mbs.items()},
        "ratio_vs_cp_sync": round(mbs["ours"] / mbs["cp_sync"], 2),
        "ratio_vs_cp_sha256sum": round(mbs["ours"] / mbs["cp_sha256sum"], 2),
        "peak_rss_mb": round(peak_rss / 1e6, 1), "cache_drop": how,
        "cpu_s": {"ours": round(ours_cpu, 2), "cp_sync": round(cp_sync_cpu, 2), "cp_sha256sum": round(cp_sha_cpu, 2)},
        "loadavg_1m_before": round(load, 2),
    }


def run_two_hashes(parked: Path, dest: Path, sources: list[Path], hasher: list[str]) -> tuple[float, float]:
    """`cp -r` + `sync`, then two hashing passes over the copies, the second after dropping their cache: the
    floor of copy-then-read-back (one hash of the bytes read, one of the bytes on the disk). Returns
    (seconds, CPU-seconds of the children)."""
    drop_caches(sources)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", str(parked), str(dest)], check=True)
    subprocess.run(["sync"], check=True)
    copies = sorted(dest.rglob("*.MP4"))
    for n in range(2):
        if n:
            drop_caches(copies)
        for copy in copies:
            subprocess.run([*hasher, str(copy)], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(dest)
    subprocess.run(["sync"], check=True)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_round(work: Path, parked: Path, sources: list[Path], nbytes: int) -> dict:
    """CPU-seconds per GiB and MB/s of ours against cp+sync and cp + two hashing passes (Debian's sha256sum,
    and OpenSSL's, which uses the same SHA-256 code as Python's hashlib), back to back, cold source caches."""
    load = os.getloadavg()[0]
    gib = nbytes / (1 << 30)
    runs = {"cp_sync": run_shell(parked, work / "cp-sync", sources, ["sync"]),
            "cp_2x_sha256sum": run_two_hashes(parked, work / "cp-2sha", sources, ["sha256sum"]),
            "cp_2x_openssl": run_two_hashes(parked, work / "cp-2ossl", sources, ["openssl", "dgst", "-sha256"])}
    ours_dir = work / "ours"
    ours_dir.mkdir()
    ours, peak_rss, _how, ours_cpu = run_ours(ours_dir, parked, sources)
    shutil.rmtree(ours_dir)
    subprocess.run(["sync"], check=True)
    runs["ours"] = (ours, ours_cpu)
    cpu = {k: cpu_s / gib for k, (_, cpu_s) in runs.items()}
    mbs = {k: nbytes / 1e6 / seconds for k, (seconds, _) in runs.items()}
    return {"loadavg_1m_before": round(load, 2), "peak_rss_mb": round(peak_rss / 1e6, 1),
            "cpu_s_per_gib": {k: round(v, 2) for k, v in cpu.items()},
            "mb_s": {k: round(v, 1) for k, v in mbs.items()},
            "cpu_vs_cp_2x_sha256sum": round(cpu["ours"] / cpu["cp_2x_sha256sum"], 2),
            "cpu_vs_cp_2x_openssl": round(cpu["ours"] / cpu["cp_2x_openssl"], 2),
            "speed_vs_cp_sync": round(mbs["ours"] / mbs["cp_sync"], 2)}


@contextmanager
def parked_dock(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, Path, list[Path], int]]:
    """A scratch folder with the recorders' files written once (`--gib` over `--recorders` x `--files`), parked
    for the rounds to dock: (work, parked, sources, their bytes); removed after."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.dir))
    try:
        parked = work / "recorders"
        sources = make_dock(parked, args.recorders, args.files, int(args.gib * (1 << 30)))
        yield work, parked, sources, sum(p.stat().st_size for p in sources)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main_cpu(args: argparse.Namespace) -> None:
    """--cpu: CPU-seconds per GiB of ingest against cp + two hashing passes, and speed against cp+sync."""
    with parked_dock(args, "bench-ingest-cpu-") as (work, parked, sources, nbytes):
        rounds = [cpu_round(work, parked, sources, nbytes) for _ in range(args.rounds)]
    result = {"bytes": nbytes, "files": len(sources), "recorders": args.recorders, "cores": os.cpu_count(),
              "rounds": rounds,
              "median_cpu_vs_cp_2x_sha256sum": statistics.median(r["cpu_vs_cp_2x_sha256sum"] for r in rounds),
              "median_cpu_vs_cp_2x_openssl": statistics.median(r["cpu_vs_cp_2x_openssl"] for r in rounds),
              "median_speed_vs_cp_sync": statistics.median(r["speed_vs_cp_sync"] for r in rounds)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"ingest CPU: {nbytes / (1 << 30):.2f} GiB in {len(sources)} files from {args.recorders} recorders, "
          f"{os.cpu_count()} cores; CPU-s per GiB (user+system) and MB/s, cold source caches")
    print("round  load   ours      cp+sync   cp+2x sha256sum  cp+2x openssl   ours/2x sha256sum  "
          "ours/2x openssl  ours/cp+sync speed")
    for i, r in enumerate(rounds, 1):
        c, m = r["cpu_s_per_gib"], r["mb_s"]
        print(f"{i:5d}  {r['loadavg_1m_before']:4.1f}  {c['ours']:4.2f} s {m['ours']:5.0f}  "
              f"{c['cp_sync']:4.2f} s {m['cp_sync']:5.0f}  {c['cp_2x_sha256sum']:4.2f} s {m['cp_2x_sha256sum']:5.0f}   "
              f"{c['cp_2x_openssl']:4.2f} s {m['cp_2x_openssl']:5.0f}   {r['cpu_vs_cp_2x_sha256sum']:16.2f}x  "
              f"{r['cpu_vs_cp_2x_openssl']:14.2f}x  {r['speed_vs_cp_sync']:17.2f}x")
    print(f"median: CPU {result['median_cpu_vs_cp_2x_sha256sum']:.2f}x cp+2x sha256sum, "
          f"{result['median_cpu_vs_cp_2x_openssl']:.2f}x cp+2x openssl (goal <= 1.3x); speed "
          f"{result['median_speed_vs_cp_sync']:.2f}x cp+sync (goal >= 0.8x)")


def paired_round(work: Path, parked: Path, sources: list[Path], nbytes: int, other: Path, first: bool) -> dict:
    """--against: cp+sync, this tree's daemon and `other`'s (this one first when `first`), cp+sync again, on the
    same dock with cold source caches. cp+sync is timed before and after because on a VM its speed depends on
    what ran just before it (docs/BENCHMARKS.md "Ingest speed"); each ingest is compared with their mean."""
    load = os.getloadavg()[0]
    before = run_shell(parked, work / "cp-sync", sources, ["sync"])
    ours: dict[str, tuple[float, float]] = {}
    for who in (["ours", "other"] if first else ["other", "ours"]):
        run_dir = work / who
        run_dir.mkdir()
        seconds, _peak, _how, cpu_s = run_ours(run_dir, parked, sources,
                                               agent=None if who == "ours" else other / ".venv/bin/edge-agent")
        shutil.rmtree(run_dir)
        subprocess.run(["sync"], check=True)
        ours[who] = (seconds, cpu_s)
    after = run_shell(parked, work / "cp-sync", sources, ["sync"])
    cp_mean = (before[0] + after[0]) / 2
    gib = nbytes / (1 << 30)
    return {"loadavg_1m_before": round(load, 2), "first": "ours" if first else "other",
            "mb_s": {"cp_sync_before": round(nbytes / 1e6 / before[0], 1), "cp_sync_after": round(
                nbytes / 1e6 / after[0], 1), **{k: round(nbytes / 1e6 / v[0], 1) for k, v in ours.items()}},
            "cpu_s_per_gib": {"cp_sync_before": round(before[1] / gib, 2), "cp_sync_after": round(after[1] / gib, 2),
                              **{k: round(v[1] / gib, 2) for k, v in ours.items()}},
            "speed_vs_cp_sync_mean": {k: round(cp_mean / v[0], 2) for k, v in ours.items()},
            "ours_vs_other_speed": round(ours["other"][0] / ours["ours"][0], 2)}


def main_paired(args: argparse.Namespace) -> None:
    """--against TREE: this tree's ingest and TREE's in the same rounds (see `paired_round`)."""
    other = Path(args.against).resolve()
    if not (other / ".venv/bin/edge-agent").exists():
        raise SystemExit(f"{other}/.venv/bin/edge-agent not found: run scripts/setup.sh in {other} first")
    with parked_dock(args, "bench-ingest-pair-") as (work, parked, sources, nbytes):
        rounds = [paired_round(work, parked, sources, nbytes, other, i % 2 == 1) for i in range(args.rounds)]
    result = {"bytes": nbytes, "files": len(sources), "against": str(other), "rounds": rounds,
              "median_speed_vs_cp_sync_mean": {k: statistics.median(r["speed_vs_cp_sync_mean"][k] for r in rounds)
                                               for k in ("ours", "other")},
              "median_cpu_s_per_gib": {k: statistics.median(r["cpu_s_per_gib"][k] for r in rounds)
                                       for k in ("ours", "other")},
              "median_ours_vs_other_speed": statistics.median(r["ours_vs_other_speed"] for r in rounds)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"paired ingest: {nbytes / (1 << 30):.2f} GiB in {len(sources)} files, this tree against {other}; "
          "MB/s (CPU-s per GiB)")
    print("round  load  first  cp+sync before   cp+sync after    ours             other            "
          "ours/other vs mean cp+sync")
    for i, r in enumerate(rounds, 1):
        m, c, v = r["mb_s"], r["cpu_s_per_gib"], r["speed_vs_cp_sync_mean"]
        print(f"{i:5d}  {r['loadavg_1m_before']:4.1f}  {r['first']:5s}  "
              + "  ".join(f"{m[k]:6.0f} ({c[k]:4.2f})  " for k in ("cp_sync_before", "cp_sync_after", "ours", "other"))
              + f"{r['ours_vs_other_speed']:5.2f}x  {v['ours']:.2f}x / {v['other']:.2f}x")
    med = result["median_speed_vs_cp_sync_mean"]
    print(f"median: ours {med['ours']:.2f}x, other {med['other']:.2f}x the mean cp+sync (goal >= 0.8x); ours "
          f"{result['median_ours_vs_other_speed']:.2f}x other's speed; CPU-s/GiB ours "
          f"{result['median_cpu_s_per_gib']['ours']:.2f}, other {result['median_cpu_s_per_gib']['other']:.2f}")


def make_card(card: Path, count: int, size: int) -> list[Path]:
    """A card of `count` photos of `size` bytes (incompressible), an hour old."""
    (card / "DCIM/100PHOTO").mkdir(parents=True)
    past = time.time() - 3600
    out = []
    for i in range(count):
        path = card / f"DCIM/100PHOTO/IMG_{i:05d}.JPG"
        path.write_bytes(os.urandom(size))
        os.utime(path, (past, past))
        out.append(path)
    return out


def run_small(work: Path, count: int, size: int, suite: str | None = None) -> dict:
    """`edge-agent import` of a card of small files against cp -r + sync, each with cold source caches."""
    card = work / "card"
    sources = make_card(card, count, size)
    drop_caches(sources)
    t0 = time.monotonic()
    subprocess.run(["cp", "-r", str(card), str(work / "cp-sync")], check=True)
    subprocess.run(["sync"], check=True)
    cp_sync = time.monotonic() - t0
    shutil.rmtree(work / "cp-sync")
    ours_dir = work / "ours"
    ours_dir.mkdir()
    config = write_config(ours_dir, ours_dir / "no-dock")
    how = drop_caches(sources)
    t0 = time.monotonic()
    done = subprocess.run([str(EDGE_AGENT), "--config", str(config), "--json", "import", str(card),
                           "--device", "CAM0001", "--reason", "benchmark"], capture_output=True, text=True)
    ours = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"edge-agent import failed: {done.stderr[-2000:]}")
    sealed_files = sealed(ours_dir / "data" / "catalog.sqlite")
    if sealed_files != count:
        raise SystemExit(f"only {sealed_files} of {count} files sealed")
    suited = {}
    if suite is not None:   # the same card, imported again by an agent of `suite`
        suite_dir = work / "ours-suite"
        suite_dir.mkdir()
        config = write_config(suite_dir, suite_dir / "no-dock", suite)
        drop_caches(sources)
        t0 = time.monotonic()
        done = subprocess.run([str(EDGE_AGENT), "--config", str(config), "--json", "import", str(card),
                               "--device", "CAM0001", "--reason", "benchmark"], capture_output=True, text=True)
        took = time.monotonic() - t0
        if done.returncode != 0 or sealed(suite_dir / "data" / "catalog.sqlite") != count:
            raise SystemExit(f"edge-agent import under {suite} failed: {done.stderr[-2000:]}")
        suited = {"suite": suite, "suite_files_s": round(count / took, 1), "suite_seconds": round(took, 2),
                  "suite_vs_default": round(ours / took, 3)}
    return {**suited, "files": count, "file_bytes": size, "cache_drop": how, "cores": os.cpu_count(),
            "loadavg_1m_before": round(os.getloadavg()[0], 2),
            "files_s": {"ours": round(count / ours, 1), "cp_sync": round(count / cp_sync, 1)},
            "seconds": {"ours": round(ours, 2), "cp_sync": round(cp_sync, 2)},
            "ratio_vs_cp_sync": round(cp_sync / ours, 3)}


def main_small(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-small-", dir=args.dir))
    try:
        result = run_small(work, args.count, args.kib * 1000, args.suite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"small-file import: {result['files']} files of {args.kib} KB, {result['cores']} cores, "
          f"load {result['loadavg_1m_before']}, source cache dropped ({result['cache_drop']})")
    print(f"ours    {result['files_s']['ours']:8.1f} files/s  ({result['seconds']['ours']:.2f} s)")
    print(f"cp+sync {result['files_s']['cp_sync']:8.1f} files/s  ({result['seconds']['cp_sync']:.2f} s)")
    print(f"ratio vs cp+sync {result['ratio_vs_cp_sync']:.3f}x; goal >= 500 files/s: "
          f"{'met' if result['files_s']['ours'] >= 500 else 'NOT met'}")
    if "suite" in result:
        print(f"ours under {result['suite']}: {result['suite_files_s']:.1f} files/s ({result['suite_seconds']:.2f} s), "
              f"{result['suite_vs_default']:.3f}x the default suite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="total size of the recorders' files (GiB)")
    parser.add_argument("--recorders", type=int, default=8)
    parser.add_argument("--files", type=int, default=4, help="files per recorder")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; ratios are per round, "
                        "summarised by their median")
    parser.add_argument("--dir", default="/var/tmp", help="where to work (a real disk, not tmpfs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--cpu", action="store_true", help="CPU-seconds per GiB against cp + two hashing passes")
    parser.add_argument("--small", action="store_true", help="many small files through `edge-agent import`")
    parser.add_argument("--count", type=int, default=2000, help="with --small: how many files")
    parser.add_argument("--kib", type=int, default=20, help="with --small: size of each file (KB)")
    parser.add_argument("--suite", choices=["sm2", "ed25519+sm2"], default=None,
                        help="also run ours under this [crypto] suite, right after the default, every round")
    parser.add_argument("--encrypt", default="", help="comma-separated [store] encrypt algorithms (sm4-gcm, "
                        "aes-256-gcm) also measured in every round against the default plaintext store")
    parser.add_argument("--against", default=None, metavar="TREE",
                        help="paired: each round cp+sync, this tree's ingest and TREE's (its own .venv; order "
                        "alternating), cp+sync again; each ingest against the mean of the two cp+sync")
    args = parser.parse_args()
    encrypt = [a for a in args.encrypt.split(",") if a]
    if args.against:
        main_paired(args)
        return
    if args.small:
        main_small(args)
        return
    if args.cpu:
        main_cpu(args)
        return
    total = int(args.gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.dir))
    try:
        parked = work / "recorders"
        sources = make_dock(parked, args.recorders, args.files, total)
        nbytes = sum(p.stat().st_size for p in sources)
        rounds = [one_round(work, parked, sources, nbytes, encrypt, args.suite) for _ in range(args.rounds)]
        result = {
            "bytes": nbytes, "files": len(sources), "recorders": args.recorders, "cores": os.cpu_count(),
            "rounds": rounds,
            "median_ratio_vs_cp_sync": statistics.median(r["ratio_vs_cp_sync"] for r in rounds),
            "median_ratio_vs_cp_sha256sum": statistics.median(r["ratio_vs_cp_sha256sum"] for r in rounds),
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
            **({} if args.suite is None else {"suite": args.suite, "median_suite_vs_default": statistics.median(
                r["suite_vs_default"] for r in rounds)}),
            **({"median_encrypted_ratio_vs_plain": {a: statistics.median(r["encrypted"][a]["ratio_vs_plain"]
                                                                        for r in rounds) for a in encrypt}}
               if encrypt else {}),
        }
        if args.json:
            print(json.dumps(result))
            return
        print(f"ingest benchmark: {nbytes / (1 << 30):.2f} GiB in {len(sources)} files from {args.recorders} "
              f"recorders, {os.cpu_count()} cores, page cache of the sources dropped ({rounds[0]['cache_drop']}) "
              "before each run")
        print("round  load   ours MB/s  cp+sync MB/s  cp+sha256sum MB/s  vs cp+sync  vs cp+sha256sum  "
              "peak RSS MB  CPU s ours/cp+sync/cp+sha256sum")
        for i, r in enumerate(rounds, 1):
            print(f"{i:5d}  {r['loadavg_1m_before']:4.1f}  {r['mb_s']['ours']:10.1f}  {r['mb_s']['cp_sync']:12.1f}  "
                  f"{r['mb_s']['cp_sha256sum']:17.1f}  {r['ratio_vs_cp_sync']:8.2f}x  "
                  f"{r['ratio_vs_cp_sha256sum']:14.2f}x  {r['peak_rss_mb']:11.1f}  "
                  f"{r['cpu_s']['ours']:.1f}/{r['cpu_s']['cp_sync']:.1f}/{r['cpu_s']['cp_sha256sum']:.1f}")
        for i, r in enumerate(rounds, 1):
            for algorithm, e in r.get("encrypted", {}).items():
                print(f"round {i} encrypt={algorithm}: {e['mb_s']:.1f} MB/s vs {r['mb_s']['ours']:.1f} plain "
                      f"({e['ratio_vs_plain']:.2f}x), CPU s {e['cpu_s']:.1f} vs {r['cpu_s']['ours']:.1f}, "
                      f"peak RSS {e['peak_rss_mb']:.1f} MB")
        for algorithm, ratio in result.get("median_encrypted_ratio_vs_plain", {}).items():
            print(f"median encrypt={algorithm} vs plaintext store: {ratio:.2f}x")
        print(f"median ratio vs cp+sync {result['median_ratio_vs_cp_sync']:.2f}x (goal >= 0.5x), "
              f"vs cp+sha256sum {result['median_ratio_vs_cp_sha256sum']:.2f}x (goal >= 1.5x), "
              f"peak RSS {result['max_peak_rss_mb']:.1f} MB (goal < 200 MB)")
        if args.suite is not None:
            print(f"under {args.suite}: " + ", ".join(f"{r['suite_mb_s']:.1f} MB/s ({r['suite_cpu_s']:.1f} CPU s, "
                                                      f"{r['suite_peak_rss_mb']:.1f} MB)" for r in rounds)
                  + f"; median {result['median_suite_vs_default']:.3f}x the default suite's throughput")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
