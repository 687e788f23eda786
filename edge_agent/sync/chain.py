"""The chain stream: every signed document, in chain order, to the platform (docs/PROTOCOL.md section 10).

Files travel several at a time, so their manifests reach the platform in any order; the chain is one
sequence, so it travels on a stream of its own. `ChainRelay` runs on the uplink's sender thread:

- after every connect it publishes a `chain/query` with the agent's own head; the receiver answers on
  `chain_acks` with the head it holds (or refuses a head behind its own: a rewind);
- from the held head on it publishes `{"seq","doc"}` for each document of the catalog's `documents` table,
  at most `CHAIN_WINDOW` beyond the held head, read from the durable catalog and the document files (so a
  restart, a lost message or another receiver resumes from what the platform holds);
- every answer carries the receiver's signed chain receipt of its held head. One that verifies against the
  pinned receiver keys and names this agent, at a seq whose local document has the receipted SHA-256, is kept
  in the catalog (`chain_receipt`, the highest one) with the newest checkpoint it covers;
- `gap` (the receiver lacks a document before the one sent): send again from its head; no answer within the
  ack timeout: ask again; `refused` (fork, rewind) with a receipt signed by a pinned receiver key: the alarm
  `chain_refused`, and nothing more is sent until the next connect or `sync now` (an unsigned refusal is
  counted and ignored, so nobody but the platform can stop the stream).

Chain messages are small and few (one per sealed file, plus sessions, annotations and checkpoints) and are
relayed at most every `CHAIN_INTERVAL_S` unless an answer came, so file chunks keep the connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.catalog import Catalog
from edge_agent.evidence.manifest import ManifestError, read_document
from edge_agent.evidence.receipts import PinnedKeys, ReceiptError, verify_chain_receipt
from edge_agent.layout import StoreLayout
from edge_agent.protocol.canonical import canonical_json
from edge_agent.protocol.wire import Topics

log = logging.getLogger(__name__)

CHAIN_WINDOW = 16          # documents sent beyond the receiver's held head
CHAIN_INTERVAL_S = 0.25    # how often the catalog is read for new documents (at once after an answer)
RECEIPT_WRITE_S = 1.0      # a higher chain receipt is written to the catalog at most this often, unless it
                           # covers a new checkpoint or the whole local chain
ALARM_REFUSED = "chain_refused"
ALARM_UNVERIFIED = "chain_receipt_unverified"

Publish = Callable[[str, bytes], "mqtt.MQTTMessageInfo | None"]


class ChainRelay:
    """The agent's end of the chain stream (module docstring). Sender thread only."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, topics: Topics, publish: Publish, *,
                 keys: PinnedKeys, ack_timeout_s: float):
        self.catalog = catalog
        self.layout = layout
        self.topics = topics
        self.publish = publish
        self.keys = keys
        self.ack_timeout_s = ack_timeout_s
        self.held: int | None = None       # the receiver's held head, from its last answer (None: ask)
        self.next_seq = 1
        self.refused: str | None = None
        self.unverified = 0                # answers whose receipt proved nothing
        self._query_due = True
        self._due = True
        self._next_read = 0.0
        self._waiting_since: float | None = None   # a query or documents are unanswered since then
        self._resent_from: int | None = None       # the seq a gap answer last sent us back to
        self._kept: tuple[int, int | None] | None = None   # (seq, checkpoint seq) of the receipt in the catalog
        self._kept_at = 0.0

    # -- the sender thread's calls -------------------------------------------------------------

    def reset(self) -> None:
        """A new connection (or `sync now`): ask the receiver's head again, refused or not."""
        self.held, self.refused, self._query_due, self._due = None, None, True, True

    def relay(self, now: float) -> None:
        """Publish what is due: the query, or the next documents within the window."""
        if self.refused is not None:
            return
        if self._waiting_since is not None and now - self._waiting_since > self.ack_timeout_s:
            self._query_due = True   # lost on the way (either direction): ask again, send from its head
        if self._query_due:
            self._query(now)
            return
        if self.held is None or not (self._due or now >= self._next_read):
            return
        self._due, self._next_read = False, now + CHAIN_INTERVAL_S
        room = self.held + CHAIN_WINDOW - self.next_seq + 1
        if room <= 0:
            return
        for row in self.catalog.documents.after(self.next_seq - 1, room):
            try:
                raw = (self.layout.data_dir / row["path"]).read_bytes()
            except OSError as exc:
                log.error("chain document unreadable seq=%d path=%s: %s; run: edge-agent verify", row["seq"],
                          row["path"], exc)
                return
            # {"doc":<the document's canonical bytes>,"seq":N} is canonical JSON: keys in order, no spaces.
            payload = b'{"doc":' + raw + b',"seq":' + str(row["seq"]).encode("ascii") + b"}"
            if self.publish(self.topics.chain_doc, payload) is None:
                return
            self.next_seq = row["seq"] + 1
            if self._waiting_since is None:
                self._waiting_since = now

    def answer(self, ack: dict[str, Any]) -> None:
        """A decoded `chain_acks` message (schema chain-ack)."""
        self._waiting_since, self._due = None, True
        self._keep_receipt(ack)
        seq = ack["seq"]
        if ack["state"] == "refused":
            try:   # only the platform may stop the chain stream: its refusal carries its signed head
                verify_chain_receipt(ack.get("receipt"), self.keys, self.topics.agent_id)
            except ReceiptError as exc:
                self.unverified += 1
                log.warning("chain refusal ignored: it carries no receipt signed by a pinned receiver key (%s)", exc)
                return
            self.held, self.refused = seq, ack.get("reason") or "refused"
            message = (f"the platform refuses this agent's chain ({ack.get('refusal')}): {self.refused}. Nothing "
                       "more is sent on the chain stream; files still sync. Compare `edge-agent verify --all` "
                       "with the platform's copy of the chain before anything else is done")
            if self.catalog.raise_alarm(ALARM_REFUSED, ALARM_REFUSED, "chain", message):
                log.error("chain refused refusal=%s held=%d: %s", ack.get("refusal"), seq, self.refused)
            return
        if self.held is None or seq >= self.held or ack["state"] == "gap":
            self.held = seq
        if ack["state"] == "gap" and self._resent_from != seq + 1:
            # The documents after the missing one were sent too, and each gets a `gap`: go back once per gap.
            self.next_seq = self._resent_from = seq + 1
        elif self.next_seq <= seq:
            self.next_seq = seq + 1
        if self.next_seq - 1 > seq:
            self._waiting_since = time.monotonic()   # documents beyond its head are still on the way

    # -- internals -----------------------------------------------------------------------------

    def _query(self, now: float) -> None:
        head = self.catalog.documents.head()
        body = {"head": None if head is None else {"seq": head[0], "sha256": head[1]}}
        if self.publish(self.topics.chain_query, canonical_json(body)) is not None:
            self._query_due, self._waiting_since = False, now
            self.held, self.next_seq, self._resent_from = None, 0, None   # resume from the head it names

    def _keep_receipt(self, ack: dict[str, Any]) -> None:
        receipt = ack.get("receipt")
        if receipt is None:
            return
        try:
            doc = verify_chain_receipt(receipt, self.keys, self.topics.agent_id)
            if (doc["seq"], doc["sha256"]) != (ack["seq"], ack.get("sha256")):
                raise ReceiptError(f"the receipt binds seq {doc['seq']}, the answer says {ack['seq']}")
            row = self.catalog.documents.at(doc["seq"])
            if row is None or row["sha256"] != doc["sha256"]:
                raise ReceiptError(f"the receipt binds document {doc['seq']} with SHA-256 {doc['sha256'][:16]}…, "
                                   "which is not this agent's document at that seq")
        except ReceiptError as exc:
            self.unverified += 1
            if self.catalog.raise_alarm(ALARM_UNVERIFIED, ALARM_UNVERIFIED, "chain",
                                        f"a chain receipt was not accepted: {exc}. If the platform's receiver key "
                                        "changed, pin it in mqtt.receiver_keys; otherwise check the broker's ACL"):
                log.warning("chain receipt unverified: %s", exc)
            return
        if self._kept is None:
            held = self.catalog.chain_receipts.get()
            self._kept = (held.seq, held.checkpoint_seq) if held is not None else (0, None)
        if self._kept[0] >= doc["seq"]:
            return
        # One catalog transaction per receipt would cost a commit per document on the sender thread: a higher
        # receipt is written when it covers a new checkpoint or the whole chain, else at most every second.
        checkpoint = self.catalog.documents.latest("checkpoint", doc["seq"])
        checkpoint_seq = checkpoint["seq"] if checkpoint is not None else None
        head = self.catalog.documents.head()
        now = time.monotonic()
        if (checkpoint_seq == self._kept[1] and (head is None or doc["seq"] < head[0])
                and now - self._kept_at < RECEIPT_WRITE_S):
            return
        checkpoint_seq, body = self._checkpoint_body(checkpoint)
        if self.catalog.chain_receipts.record(doc, checkpoint_seq, body):
            self.catalog.clear_alarm(ALARM_UNVERIFIED)
            log.info("chain receipted seq=%d checkpoint_seq=%s", doc["seq"], checkpoint_seq)
        self._kept, self._kept_at = (doc["seq"], checkpoint_seq), now

    def _checkpoint_body(self, row: Any) -> tuple[int | None, dict[str, Any] | None]:
        """The seq and the document of the checkpoint `row` (None, None: no checkpoint, or unreadable)."""
        if row is None:
            return None, None
        try:
            return row["seq"], read_document(self.layout.data_dir / row["path"])
        except ManifestError as exc:
            log.error("checkpoint document unreadable seq=%d: %s", row["seq"], exc)
            return None, None

    def health(self) -> dict[str, Any]:
        """What the platform holds of the chain (its receipted head and checkpoint) against the local head."""
        kept = self.catalog.chain_receipts.get()
        head = self.catalog.documents.head()
        return {"head_seq": head[0] if head else 0,
                "receipted_seq": kept.seq if kept else None,
                "receipted_checkpoint_seq": kept.checkpoint_seq if kept else None,
                "refused": self.refused}
