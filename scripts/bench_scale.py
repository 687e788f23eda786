#!/usr/bin/env python3
"""Scale benchmarks (issue 6).

`catalog`: a catalog of N file rows (default 1,000,000, bulk-inserted in one transaction) with a large
unsynced backlog, against a baseline catalog of 1,000 rows with the same mix, built in the same run:
start-up recovery (`Ingestor.recover`), next-file selection (`Catalog.next_to_send`) and `edge-agent status`
(the real CLI in a subprocess). Prints each figure, its baseline and the ratio.

Usage: .venv/bin/python scripts/bench_scale.py catalog [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.catalog import LANE_CAMERA, LANE_RECORDER, Catalog, new_id, now_ms  # noqa: E402
from edge_agent.config import parse_config  # noqa: E402
from edge_agent.ingest import Ingestor, Sealer  # noqa: E402
from edge_agent.manifest import AgentKey  # noqa: E402
from edge_agent.store import StoreLayout  # noqa: E402

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

# The mix of a busy site after a week-long uplink outage: most history synced or purged, a tenth unsynced.
MIX = (("purged", 0.60), ("source_cleared", 0.20), ("synced", 0.099), ("sealed", 0.10),
       ("sending", 0.0001), ("staged", 0.0004), ("discovered", 0.0005))


def build_catalog(data_dir: Path, rows: int, seed: int = 6) -> tuple[Path, float]:
    """A catalog of `rows` file rows in MIX proportions; returns (config path, seconds to insert)."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    os.chmod(data_dir, 0o750)
    config_path = data_dir.parent / f"{data_dir.name}.toml"
    config_path.write_text(f'[agent]\nid = "ws-scale"\nsite = "s"\nunit = "u"\ndata_dir = "{data_dir}"\n'
                           "min_free_mb = 0\n")
    catalog = Catalog(data_dir / "catalog.sqlite")
    start_ms = now_ms() - 30 * 86_400_000
    states = [s for s, share in MIX for _ in range(max(1, round(share * rows)))][:rows]
    states += ["purged"] * (rows - len(states))
    rng.shuffle(states)
    began = time.perf_counter()
    with catalog.transaction() as conn:
        batch = []
        for i, state in enumerate(states):
            created = start_ms + i * (30 * 86_400_000 // rows)
            done = state in ("staged", "sealed", "sending", "synced", "source_cleared", "purged")
            lane = LANE_CAMERA if i % 3 == 0 else LANE_RECORDER
            batch.append((new_id(), state, "camera" if lane == LANE_CAMERA else "recorder", f"DEV{i % 400:04d}",
                          f"DCIM/100/F{i:08d}.MP4", 10_000_000 + i % 1000, 1_700_000_000_000_000_000 + i,
                          created - 60_000, created, rng.randrange(1 << 20, 200 << 20) if done else None,
                          f"{i:064x}" if done else None, f"store/{i % 256:02x}/F{i:08d}.mp4"
                          if done and state != "purged" else None, lane, created, created,
                          created + 5_000 if state in ("synced", "source_cleared", "purged") else None))
            if len(batch) == 50_000:
                _insert(conn, batch)
                batch = []
        _insert(conn, batch)
    seconds = time.perf_counter() - began
    catalog.conn.execute("ANALYZE")
    catalog.close()
    return config_path, seconds


def _insert(conn, batch: list[tuple]) -> None:
    conn.executemany(
        "INSERT INTO files (file_id, state, kind, device_id, original_path, source_size, source_mtime_ns,"
        " recorded_start_ms, created_ms, size, sha256, store_path, lane, updated_ms, ingested_at_ms, synced_ms,"
        " retention, attempts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'routine',0)", batch)


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls."""
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def measure(config_path: Path) -> dict[str, float]:
    import tomllib

    cfg = parse_config(tomllib.loads(config_path.read_text()), config_path)
    layout = StoreLayout(cfg.agent.data_dir)
    layout.create()
    catalog = Catalog(cfg.catalog_path)
    sealer = Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, cfg)
    ingestor = Ingestor(catalog, layout, sealer, cfg)
    out = {"recover_s": timed(ingestor.recover, 1)}  # once: it moves staged rows back to discovered
    out["recover_again_s"] = timed(ingestor.recover, 3)
    out["next_to_send_s"] = timed(lambda: catalog.next_to_send(1), 20)
    out["next_to_send_window_s"] = timed(lambda: catalog.next_to_send(4, exclude={"a", "b", "c"}), 20)
    out["counts_by_state_s"] = timed(catalog.counts_by_state, 5)
    out["store_bytes_s"] = timed(ingestor.store_bytes, 5)  # asked before every copy (the disk limit)
    catalog.close()
    out["cli_status_s"] = timed(lambda: subprocess.run([EDGE_AGENT, "--config", str(config_path), "--json",
                                                        "status"], check=True, capture_output=True), 3)
    return out


def bench_catalog(rows: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        base_cfg, base_insert = build_catalog(Path(tmp) / "base", 1_000)
        big_cfg, big_insert = build_catalog(Path(tmp) / "big", rows)
        size_mb = (Path(tmp) / "big" / "catalog.sqlite").stat().st_size / 2**20
        base, big = measure(base_cfg), measure(big_cfg)
    print(f"catalog scale: {rows:,} rows ({size_mb:.0f} MiB, inserted in {big_insert:.1f} s) vs baseline 1,000 rows"
          f" (inserted in {base_insert:.3f} s); mix {', '.join(f'{s} {p:.2%}' for s, p in MIX)}")
    print(f"{'what':<26}{'ours (ms)':>12}{'baseline (ms)':>15}{'ratio':>9}")
    for key in big:
        print(f"{key:<26}{big[key] * 1000:>12.1f}{base[key] * 1000:>15.1f}{big[key] / base[key]:>9.1f}")
    print(json.dumps({"rows": rows, "ours": big, "baseline": base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    cat = sub.add_parser("catalog", help="1,000,000-row catalog: recovery, next-file selection, status")
    cat.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.what == "catalog":
        bench_catalog(args.rows)


if __name__ == "__main__":
    main()
