"""The agent's check of a receiver's verdict: a `complete` or `rejected` ack counts only with its receipt.

`judge(ack, expected, keys)` is pure: the verdict a settled ack proves, or `Unverified` with the reason.
- `complete` proves the file synced only if its receipt verifies against a pinned receiver key
  (`mqtt.receiver_keys`) and binds this agent, this file, the catalog's SHA-256 and size and the SHA-256 of
  the manifest the agent sealed. A receipt, genuinely signed for this agent and file, that names another
  SHA-256 is the receiver's word that it holds a different file under this id: a rejection.
- `rejected` counts only with a receipt signed by a pinned key for this agent and file (its signed reason
  is the one kept), so nobody but the platform can stall a file either.
Anything else is `Unverified`: it changes nothing (the transfer goes on, its ack timeout re-asks the
receiver).

`ReceiptGate` applies that on the sender thread: it counts unverified acks, raises `ack_unverified` once per
file (an alarm and its event), and, once the ledger has committed the receipt with the file's `synced`, writes
its copy beside the manifest without waiting for the disk (`keep_copy`); the uplink rewrites lost copies from
the catalog at start (`restore_copies`) and makes them durable at a clean stop (`seal_copies`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edge_agent.catalog import Catalog, FileRecord
from edge_agent.clock import now_ms
from edge_agent.config import ConfigError, Problem
from edge_agent.durable import SyncGroup, atomic_write_many
from edge_agent.evidence.manifest import canonical_json
from edge_agent.evidence.receipts import Expected, PinnedKeys, ReceiptError, check_bindings, verify_receipt
from edge_agent.layout import StoreLayout
from edge_agent.protocol.wire import ACK_COMPLETE, ACK_REJECTED, Ack
from edge_agent.sync.transfer import MarkSynced, Unverified, Verdict, verdict

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)
COPIES_DURABLE = "receipt_copies_durable_ms"   # meta: every receipt received before this has a durable copy


def judge(ack: Ack, expected: Expected, keys: PinnedKeys) -> Verdict | Unverified:
    """What a `complete` or `rejected` ack proves about the file `expected` describes (module docstring)."""
    if ack.state not in (ACK_COMPLETE, ACK_REJECTED):
        raise ValueError(f"ack state {ack.state!r} is not a verdict (complete or rejected)")
    try:
        doc = verify_receipt(ack.receipt, keys, expected.agent_id, expected.file_id)
    except ReceiptError as exc:
        return Unverified(str(exc))
    if doc.get("verdict") != ack.state:
        return Unverified(f"the ack says {ack.state} but its receipt says {doc.get('verdict')!r}")
    # What the signed receipt says, read by the one rule for verdicts; its SHA-256 and reason, not the ack's.
    said = verdict(Ack(expected.file_id, ack.state, [], doc.get("sha256"), doc.get("reason")), expected.sha256)
    if isinstance(said, MarkSynced):
        try:
            check_bindings(doc, expected)
        except ReceiptError as exc:
            return Unverified(str(exc))
    return replace(said, receipt=doc)


class ReceiptGate:
    """The receipt rules on the sender thread, with the catalog's and the store's side effects."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, agent_id: str, receiver_keys: Path | None):
        self.catalog = catalog
        self.layout = layout
        self.agent_id = agent_id
        self.keys = PinnedKeys(receiver_keys)
        self._check_pinned(receiver_keys)
        self.unverified = 0   # acks that proved nothing, since start (stats: acks_unverified)
        self._alarmed: set[str] = set()   # files alarmed by this process: a flood costs no catalog write

    def _check_pinned(self, path: Path | None) -> None:
        """At start: a configured path that does not exist is a ConfigError; no usable key, a warning (nothing
        will sync until the platform's key is pinned, but the rest of the agent works)."""
        if path is not None and not (path.is_file() or path.is_dir()):
            raise ConfigError("mqtt.receiver_keys", [Problem("mqtt.receiver_keys", str(path),
                              "no such file or directory: give the platform's receiver public key (PEM) or a "
                              "directory of *.pem (e.g. /etc/edge-agent/receiver-keys)")])
        try:
            log.info("receiver keys pinned path=%s keys=%s", path, ",".join(sorted(self.keys.keys())))
        except ReceiptError as exc:
            log.warning("no receiver key usable: %s; no file will count as synced until one is pinned", exc)

    def judge(self, record: FileRecord, ack: Ack) -> Verdict | None:
        """The verdict `ack` proves for `record` (a `sending` file), or None: counted, and alarmed once per file."""
        result = judge(ack, Expected.of(record, self.agent_id), self.keys)
        if not isinstance(result, Unverified):
            return result
        self.unverified += 1
        raised = self.catalog.raise_alarm(
            f"ack_unverified:{record.file_id}", "ack_unverified", record.file_id,
            f"an ack '{ack.state}' for file {record.file_id} ({record.original_path}) was not accepted: "
            f"{result.reason}. Nothing was changed or deleted. If the platform's receiver key changed, pin "
            "its public key in mqtt.receiver_keys; otherwise someone may be forging acks on the broker: "
            "check its ACL")
        log.warning("ack unverified file=%s state=%s reason=%s alarm_raised=%s", record.file_id, ack.state,
                    result.reason, raised)
        return None

    def keep_copy(self, file_id: str, receipt: dict[str, Any]) -> None:
        """Write the copy of a receipt the catalog already holds (committed) beside the manifest
        (`receipts/<aa>/<file_id>.json`), without waiting for the disk: the catalog is the record, and
        `restore_copies` at the next start rewrites a copy a crash lost. (Written durably before the commit,
        it cost the sender thread two fsyncs per file: most of what receipts added to a small file's sync.)"""
        try:
            write_copy(self.layout.receipt_path(file_id), canonical_json(receipt))
        except OSError as exc:   # e.g. a full disk: the file is synced all the same; restored at the next start
            log.warning("receipt copy not written file=%s: %s; it is restored from the catalog at the next "
                        "start", file_id, exc)


def write_copy(path: Path, data: bytes) -> None:
    """`data` at `path` (read-only), replacing what is there by rename; not fsynced (nor is a directory made
    for it: `restore_copies` makes them durable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def restore_copies(catalog: Catalog, layout: StoreLayout) -> int:
    """At start: every receipt the catalog received since the copies were last made durable
    (`meta.receipt_copies_durable_ms`) has its copy beside the manifest, byte for byte; a missing or torn one
    (a crash before the kernel wrote it) is rewritten. Then all of them are made durable and the mark moves
    on. Returns how many were rewritten."""
    mark = int(catalog.meta.get(COPIES_DURABLE) or 0)
    restored, newest = 0, mark
    layout.receipts.mkdir(parents=True, exist_ok=True)
    with SyncGroup(layout.receipts, grouped=True) as group:
        for file_id, data, received_ms in catalog.receipts.received_since(mark):
            path = layout.receipt_path(file_id)
            try:
                intact = path.read_bytes() == data
            except OSError:
                intact = False
            if intact:   # written after its commit, maybe not yet on the disk, nor its directory's entry
                group.file(path)
                group.touch(path.parent)
                group.touch(path.parent.parent)
            else:
                atomic_write_many([(path, data, 0o444)], group=group)
                restored += 1
            newest = max(newest, received_ms)
        group.sync()
    if restored:
        log.warning("receipt copies restored from the catalog count=%d (lost in a crash before they reached "
                    "the disk)", restored)
    catalog.meta.set(COPIES_DURABLE, str(newest))
    return restored


def seal_copies(catalog: Catalog, layout: StoreLayout) -> None:
    """At a clean stop: every receipt copy written so far made durable at once (one syncfs of the store's
    filesystem), and the mark moved to now, so the next start checks only what comes after. Without syncfs
    (Linux < 5.8) the mark stays: the next start checks them all and syncs each."""
    started = now_ms()
    if not layout.receipts.is_dir():
        return
    with SyncGroup(layout.receipts, grouped=True) as group:
        group.touch(layout.receipts)
        group.sync()
        flushed_all = group.whole_filesystem
    if flushed_all:
        catalog.meta.set(COPIES_DURABLE, str(started))
