#!/usr/bin/env python3
"""Operations figures, each against a baseline measured in the same run:

1. scrub: our background re-verification at `--scrub-mb-s` vs an unthrottled `verify_all` of the same store
   (the bound must hold: measured rate <= configured; CPU time per MB should match the unthrottled check);
2. export: `edge-agent export` of a case (copy + hash + BagIt manifests) vs a plain copy of the same media;
3. health tick on a catalog of `--rows` files vs one full scan of the files table.

    .venv/bin/python scripts/bench_operations.py [--mb 512] [--scrub-mb-s 40] [--rows 200000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.catalog import now_ms  # noqa: E402
from edge_agent.daemon import Agent  # noqa: E402
from edge_agent.evidence.export import export_case  # noqa: E402
from edge_agent.evidence.scrub import Scrubber  # noqa: E402
from edge_agent.evidence.verify import verify_all  # noqa: E402
from edge_agent.ops.custody import tag  # noqa: E402
from edge_agent.ops.retention import Retention  # noqa: E402
from tests.helpers import agent_config  # noqa: E402
from tests.opsdata import ingest_file  # noqa: E402

MIB = 1024 * 1024


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drop_caches() -> None:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root or not allowed: both sides then read from the page cache alike


def bench_scrub(agent: Agent, total: int, rate_mb_s: float) -> None:
    drop_caches()
    t0, c0 = time.monotonic(), cpu_s()
    findings = verify_all(agent.catalog, agent.layout)
    base_s, base_cpu = time.monotonic() - t0, cpu_s() - c0
    assert not findings, findings
    config = agent.config.model_copy(update={"health": agent.config.health.model_copy(
        update={"scrub_mb_s": rate_mb_s})})
    scrubber = Scrubber(agent.catalog, agent.layout, config)
    drop_caches()
    t0, c0 = time.monotonic(), cpu_s()
    run = scrubber.run_once(budget_s=3600, force=True)
    ours_s, ours_cpu = time.monotonic() - t0, cpu_s() - c0
    assert run.pass_completed and run.findings == 0
    ours_rate, base_rate = total / MIB / ours_s, total / MIB / base_s
    print(f"scrub: {total / MIB:.0f} MiB at scrub_mb_s={rate_mb_s}: {ours_rate:.1f} MiB/s "
          f"({ours_rate / rate_mb_s:.2f}x the bound), CPU {ours_cpu:.2f} s")
    print(f"  baseline unthrottled verify_all: {base_rate:.1f} MiB/s, CPU {base_cpu:.2f} s; "
          f"ratio scrub/baseline rate {ours_rate / base_rate:.3f}, CPU ratio {ours_cpu / base_cpu:.2f}")


def bench_export(agent: Agent, work: Path, total: int) -> None:
    records = agent.catalog.files()
    for record in records:
        tag(agent.catalog, agent.sealer, agent.layout, record.file_id, case_id="BENCH-1", actor="bench")
    drop_caches()
    t0 = time.monotonic()
    plain = work / "plain-copy"
    plain.mkdir()
    for record in records:
        shutil.copyfile(agent.layout.data_dir / str(record.store_path), plain / Path(str(record.store_path)).name)
    base_s = time.monotonic() - t0
    drop_caches()
    t0 = time.monotonic()
    result = export_case(agent.catalog, agent.layout, agent.config, case_id="BENCH-1",
                         dest=work / "bag", reason="benchmark", approved_by="bench")
    ours_s = time.monotonic() - t0
    assert result.ok and result.files == len(records)
    print(f"export: {total / MIB:.0f} MiB as a BagIt bag in {ours_s:.2f} s ({total / MIB / ours_s:.0f} MiB/s); "
          f"baseline plain copy {base_s:.2f} s ({total / MIB / base_s:.0f} MiB/s); ratio {ours_s / base_s:.2f}x")


def bench_health(work: Path, rows: int) -> None:
    (work / "health").mkdir()
    _, cfg = agent_config(work / "health", agent={"max_disk_gb": 500})
    agent = Agent(cfg, dock_drivers=[])
    now = now_ms()
    states = ("sealed", "synced", "source_cleared", "purged", "synced")
    with agent.catalog.transaction() as conn:
        conn.executemany(
            "INSERT INTO files (file_id, state, kind, device_id, original_path, retention, lane, created_ms,"
            " updated_ms, attempts, size, sha256, store_path, ingested_at_ms, synced_ms)"
            " VALUES (?,?,?,?,?,?,?,?,?,0,?,?,?,?,?)",
            ((f"F{i:012d}", states[i % 5], "recorder", f"DSJ-{i % 300}", f"DCIM/{i}.MP4", "routine", 1,
              now - i * 1000, now, 50 * MIB, "0" * 64, f"store/{i}.mp4", now - i * 1000,
              None if i % 5 == 0 else now - i * 500) for i in range(rows)))
    health = agent.health_monitor(Retention(agent.catalog, agent.layout, cfg))
    health.tick()
    t0 = time.monotonic()
    agent.catalog.query("SELECT COUNT(*), SUM(size) FROM files WHERE device_id != ''")
    base_s = time.monotonic() - t0
    t0 = time.monotonic()
    ticks = 5
    for _ in range(ticks):
        health.tick()
    ours_s = (time.monotonic() - t0) / ticks
    t0 = time.monotonic()
    checks = 20
    for _ in range(checks):
        health.check_change()
    change_s = (time.monotonic() - t0) / checks
    print(f"health: tick on {rows} files {ours_s * 1000:.0f} ms, change check {change_s * 1000:.2f} ms; "
          f"baseline one full scan {base_s * 1000:.0f} ms; ratio tick/scan {ours_s / base_s:.1f}x")
    agent.catalog.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="MiB of media in the store (default 512)")
    parser.add_argument("--file-mb", type=int, default=64, help="size of each file in MiB")
    parser.add_argument("--scrub-mb-s", type=float, default=40.0, help="the scrub's configured bound")
    parser.add_argument("--rows", type=int, default=200_000, help="catalog rows for the health tick")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ops-", dir=os.environ.get("BENCH_DIR")))
    try:
        _, cfg = agent_config(work, agent={"max_disk_gb": 500, "verify_readback": False})
        agent = Agent(cfg, dock_drivers=[])
        count = max(1, args.mb // args.file_mb)
        for i in range(count):
            ingest_file(agent, work / "src", f"clip{i:04d}.bin", args.file_mb * MIB)
            (work / "src" / f"clip{i:04d}.bin").unlink()
        total = count * args.file_mb * MIB
        print(f"# bench_operations: {count} files x {args.file_mb} MiB, {os.cpu_count()} CPUs")
        bench_scrub(agent, total, args.scrub_mb_s)
        bench_export(agent, work, total)
        agent.catalog.close()
        bench_health(work, args.rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
