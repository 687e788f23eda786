"""Background scrub (G4): re-verify stored files and both chains at a bounded rate.

Each `run_once` continues from where the last one stopped (a cursor in the
catalog's meta table, so a restart does not start over), checks manifests and
signatures through `verify.verify_file`, re-hashes the media throttled to
`health.scrub_mb_s`, and at the end of a pass checks the document chain and
the audit chain. A finding is tamper: an alarm and a `tamper` event, never a
repair. Between passes it rests `health.scrub_interval_h`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from edge_agent.atrest import AtRestError
from edge_agent.catalog import Catalog, FileRecord, State
from edge_agent.catalog.alarms import TAMPER
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig
from edge_agent.digest import hash_stored
from edge_agent.evidence.keys import KeyHistory, key_history
from edge_agent.evidence.verify import Finding, verify_audit, verify_chain, verify_file
from edge_agent.layout import StoreLayout

log = logging.getLogger(__name__)

CURSOR_KEY = "scrub_cursor"
PASS_DONE_KEY = "scrub_pass_done_ms"
BATCH = 100


@dataclass
class ScrubRun:
    files: int = 0
    bytes: int = 0
    findings: int = 0
    pass_completed: bool = False


class Scrubber:
    """Re-verifies the store in the background; one instance per agent."""

    def __init__(self, catalog: Catalog, layout: StoreLayout, config: AgentConfig,
                 stop: threading.Event | None = None):
        self.catalog = catalog
        self.layout = layout
        self._keys: KeyHistory | None = None   # the signed key history, read again at each run
        self.config = config
        self.stop = stop or threading.Event()
        self.rate_bps = config.health.scrub_mb_s * 1024 * 1024
        self.status: dict[str, object] = {}
        self._paced_from, self._paced_bytes = time.monotonic(), 0

    def due(self, now: int | None = None) -> bool:
        """A pass is under way, or the rest after the last one is over."""
        now = now_ms() if now is None else now
        if self.catalog.meta_get(CURSOR_KEY):
            return True
        done = self.catalog.meta_get(PASS_DONE_KEY)
        return done is None or now - int(done) >= self.config.health.scrub_interval_h * 3600 * 1000

    def run_once(self, budget_s: float = 50.0, force: bool = False) -> ScrubRun:
        """Scrub for at most `budget_s` seconds, resuming the current pass."""
        run = ScrubRun()
        if not force and not self.due():
            return run
        deadline = time.monotonic() + budget_s
        self._paced_from, self._paced_bytes = time.monotonic(), 0
        cursor = self.catalog.meta_get(CURSOR_KEY) or ""
        self._keys = keys = key_history(self.catalog, self.layout)   # a rotation since the last run counts
        while time.monotonic() < deadline and not self.stop.is_set():
            batch = self.catalog.files.sealed_after(cursor, BATCH)
            if not batch:
                findings = verify_chain(self.catalog, self.layout, keys) + verify_audit(self.catalog)
                self._report(findings)
                run.findings += len(findings)
                run.pass_completed = True
                cursor = ""
                with self.catalog.transaction():
                    self.catalog.meta.set(CURSOR_KEY, "")
                    self.catalog.meta.set(PASS_DONE_KEY, str(now_ms()))
                break
            for record in batch:
                if time.monotonic() >= deadline or self.stop.is_set():
                    break
                findings = self.check(record)
                if self.stop.is_set():
                    break  # perhaps stopped midway: this file is checked again next time
                self._report(findings)
                run.files += 1
                if record.state != State.PURGED:
                    run.bytes += record.size or 0
                run.findings += len(findings)
                cursor = record.file_id
            self.catalog.meta.set(CURSOR_KEY, cursor)
        self.status = {"last_run_ms": now_ms(), "files": run.files, "bytes": run.bytes, "findings": run.findings,
                       "last_pass_ms": _int(self.catalog.meta_get(PASS_DONE_KEY)), "cursor": cursor or None}
        log.info("scrub files=%d bytes=%d findings=%d pass_completed=%s", run.files, run.bytes, run.findings,
                 run.pass_completed)
        return run

    def check(self, record: FileRecord) -> list[Finding]:
        keys = self._keys if self._keys is not None else key_history(self.catalog, self.layout)
        findings = verify_file(record, self.layout, keys, rehash=False)
        if record.state == State.PURGED or findings:
            return findings
        stored = self.layout.data_dir / (record.store_path or "")
        try:
            digest, size = self._throttled_hash(stored, record.file_id)
        except AtRestError as exc:   # an encrypted copy: the block that fails its tag is named
            return [Finding(record.file_id, "media", f"stored copy {exc}")]
        except OSError as exc:
            if self.catalog.get(record.file_id).state == State.PURGED:
                return []  # retention purged it since this batch was read: no longer ours to check
            return [Finding(record.file_id, "media", f"stored copy unreadable: {exc.strerror}")]
        if digest is None:
            return []  # stopped midway; run_once does not count it as checked
        if digest != record.sha256 or size != record.size:
            return [Finding(record.file_id, "media", f"stored copy {stored} does not match its manifest (sha256 "
                                                     f"{digest[:16]}…, {size} bytes): altered after sealing")]
        return []

    def _throttled_hash(self, path: os.PathLike[str], file_id: str) -> tuple[str | None, int]:
        """Hash at no more than scrub_mb_s, paced over the whole run (many small files too); (None, size)
        when stopped midway."""

        def pace(block: memoryview) -> bool:
            self._paced_bytes += len(block)
            ahead = self._paced_bytes / self.rate_bps - (time.monotonic() - self._paced_from)
            # Checked every block, not only when ahead of the pace: on a slow disk a big file must not
            # hold up the daemon's stop.
            return not (self.stop.wait(ahead) if ahead > 0 else self.stop.is_set())

        return hash_stored(path, file_id, self.layout.at_rest, pace)

    def _report(self, findings: list[Finding]) -> None:
        for finding in findings:
            raised = self.catalog.raise_alarm(
                f"tamper:{finding.subject}:{finding.what}", TAMPER, finding.subject,
                f"scrub: {finding}. The original is not repaired: compare with the platform's copy, "
                "then clear this alarm with edge-agent alarms clear KEY --reason …")
            if raised:
                self.catalog.emit_event({"type": "tamper", "subject": finding.subject, "what": finding.what,
                                         "message": finding.message, "found_by": "scrub", "ts": now_ms()})
                log.error("tamper subject=%s what=%s: %s", finding.subject, finding.what, finding.message)


def _int(value: str | None) -> int | None:
    return int(value) if value else None
