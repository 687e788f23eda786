#!/usr/bin/env python3
"""What recording a receipted file costs the sender thread (issue 10's 5 % budget, docs/BENCHMARKS.md).

The end-to-end small-file drain (`bench_sync.py --file-mb 1`) moves by tens of percent from run to run on a
shared 2-core machine, more than the budget it should check. This bench isolates the one step receipts put
on each file's path in the agent: `SyncLedger.settle` of a `complete` verdict with its signed receipt. The
same catalog and data dir, the same receipts, settled alternately in batches by:

- `ours`: the ledger as it is: the catalog transaction (receipt row + `synced`), then the receipt's copy
  beside the manifest written without fsync (restored from the catalog at start: sync/receipts.py);
- `durable copy first`: the order receipts landed with (a0fb9db..1bead61): the copy written with
  `atomic_write` (two fsyncs) before the same transaction.

It prints the median per-file time of each and what that is as a share of a 1 MiB file's time at the
end-to-end rate given (`--file-ms`, default: 1 MiB at 97 MB/s, the median drain before receipts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.catalog import State  # noqa: E402
from edge_agent.clock import now_ms  # noqa: E402
from edge_agent.daemon import Agent  # noqa: E402
from edge_agent.durable import atomic_write  # noqa: E402
from edge_agent.evidence.manifest import canonical_json  # noqa: E402
from edge_agent.sync.ledger import ACTOR, SyncLedger  # noqa: E402
from edge_agent.sync.receipts import ReceiptGate  # noqa: E402
from edge_agent.sync.transfer import MarkSynced  # noqa: E402
from tests.helpers import agent_config  # noqa: E402
from tests.opsdata import ingest_file, signed_receipt  # noqa: E402


def settle_durable_copy_first(ledger: SyncLedger, record, verdict: MarkSynced) -> None:
    """The earlier order: the copy made durable, then the catalog's transaction."""
    atomic_write(ledger.layout.receipt_path(record.file_id), canonical_json(verdict.receipt), mode=0o444)
    with ledger.catalog.transaction():
        ledger.catalog.receipts.put(record.file_id, verdict.receipt)
        ledger.catalog.transition(record.file_id, State.SYNCED, expect=State.SENDING, actor=ACTOR,
                                  reason="receiver's signed receipt binds this file's SHA-256", synced_ms=now_ms(),
                                  last_error=None, audit_detail={"sha256": verdict.sha256})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=600, help="files settled (half each way)")
    parser.add_argument("--batch", type=int, default=50, help="files per alternating batch")
    parser.add_argument("--file-ms", type=float, default=1024**2 / 97e6 * 1000,
                        help="end-to-end time of one file, to express the cost as a share")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir on /var/tmp)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-settle-", dir=args.work or "/var/tmp"))
    _, cfg = agent_config(work)
    agent = Agent(cfg, dock_drivers=[])
    gate = ReceiptGate(agent.catalog, agent.layout, cfg.agent.id, None)
    ledger = SyncLedger(agent.catalog, agent.layout, gate)
    print(f"preparing {args.files} sealed files in {work} ...", flush=True)
    cases = []
    for i in range(args.files):
        record = ingest_file(agent, work / "volume", f"REC{i:05d}.MP4", 4096)
        record = agent.catalog.transition(record.file_id, State.SENDING, expect=State.SEALED, actor="bench")
        cases.append((record, MarkSynced(record.sha256, signed_receipt(agent, record))))

    times: dict[str, list[float]] = {"ours": [], "durable copy first": []}
    ways = [("ours", ledger.settle), ("durable copy first", lambda r, v: settle_durable_copy_first(ledger, r, v))]
    for start in range(0, len(cases), args.batch):
        name, settle = ways[(start // args.batch) % 2]
        for record, verdict in cases[start:start + args.batch]:
            began = time.perf_counter()
            settle(record, verdict)
            times[name].append(time.perf_counter() - began)
    agent.catalog.close()
    shutil.rmtree(work, ignore_errors=True)

    load = os.getloadavg()[0]
    ours, before = (statistics.median(times[k]) * 1000 for k in ("ours", "durable copy first"))
    print(f"settle per file, median of {len(times['ours'])} each (load {load:.1f}):")
    print(f"  ours (copy after the commit, no fsync):   {ours:.2f} ms = {ours / args.file_ms:.1%} of a file's "
          f"{args.file_ms:.1f} ms")
    print(f"  durable copy first (two more fsyncs):     {before:.2f} ms = {before / args.file_ms:.1%}")
    print(f"  saved per file: {before - ours:.2f} ms; ratio ours/before {ours / before:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
