"""`edge-agent receiver fsck`: check a receiver store (store.py's layout) and optionally repair it.

What it finds, and what `repair` does about each (`Finding.kind`):

    half_committed       every chunk recorded, not yet stored: the commit is finished (or the transfer restarted
                         if its bytes were lost)
    stored_leftover      incoming/ of a file already in index/: removed
    no_manifest          incoming/ without a manifest.json (a crash while a manifest was accepted): removed
    index_from_manifest  an intact object with a signed manifest copy beside it but no index: the index is written
    orphan_object        an object no index names and no manifest copy explains: moved to quarantine/objects/
    bad_object           an object whose bytes do not hash to its name: moved to quarantine/objects/
    missing_object       an index entry whose object is missing or bad: moved to quarantine/index/, so the
                         agent's next manifest for it starts a new transfer (restore the object from a backup
                         if the agent no longer has the file)
    temp_file            a temporary file left by a crash (`.<name>.tmp-<pid>`): removed

Nothing is deleted that could be evidence: objects go to quarantine/, never away. Run it with the receivers
stopped (it takes each transfer's lock, but does not coordinate with a running receiver's caches).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.clock import now_ms
from edge_agent.digest import hash_file
from edge_agent.durable import atomic_write, fsync_dir, make_dirs
from edge_agent.platform.receiver.store import ChunkStore, subdirs
from edge_agent.protocol.wire import chunk_count

log = logging.getLogger(__name__)
HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Finding:
    kind: str
    path: str        # relative to the store
    detail: str
    repaired: bool = False


@dataclass
class FsckReport:
    store: str
    objects_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing found that is still to repair."""
        return all(f.repaired for f in self.findings)


class StoreCheck:
    """One pass over a store. `run()` returns the report; with `repair`, each finding is repaired as found."""

    def __init__(self, root: Path, *, repair: bool = False):
        self.root = Path(root)
        self.repair = repair
        self.store = ChunkStore(self.root)
        self.report = FsckReport(str(self.root))

    def run(self) -> FsckReport:
        try:
            self._incoming()
            indexed = self._index()
            self._objects(indexed)
            self._temp_files()
        finally:
            self.store.close()
        return self.report

    def _found(self, kind: str, path: Path, detail: str, repaired: bool = False) -> None:
        finding = Finding(kind, str(path.relative_to(self.root)), detail, repaired)
        self.report.findings.append(finding)
        log.warning("fsck finding kind=%s path=%s repaired=%s detail=%s", kind, finding.path, repaired, detail)

    # -- incoming/ ---------------------------------------------------------------------------------

    def _incoming(self) -> None:
        for agent_dir in subdirs(self.root / "incoming"):
            for transfer in subdirs(agent_dir):
                self._transfer(agent_dir.name, transfer.name, transfer)

    def _transfer(self, agent: str, file_id: str, transfer: Path) -> None:
        if self.store.stored(agent, file_id) is not None:
            self._found("stored_leftover", transfer, "already stored; its incoming/ was not removed",
                        self.repair and self._remove(transfer))
            return
        doc = self.store.manifest(agent, file_id)
        if doc is None:
            self._found("no_manifest", transfer, "a transfer without its manifest (the agent sends it again)",
                        self.repair and self._remove(transfer))
            return
        if len(self.store.have(agent, file_id)) < chunk_count(doc["size"], doc["chunk_size"]):
            return   # in progress: the agent carries on
        repaired = False
        if self.repair:
            ack = self.store.progress(agent, file_id, doc)
            repaired = True
            detail = f"commit finished: {ack.state}" + (f" ({ack.reason})" if ack.reason else "")
        else:
            detail = "every chunk is held but the file is not stored (a commit cut short)"
        self._found("half_committed", transfer, detail, repaired)

    # -- index/ ------------------------------------------------------------------------------------

    def _index(self) -> dict[str, list[Path]]:
        """Every index entry by the object it names (entries whose object is missing are reported)."""
        indexed: dict[str, list[Path]] = {}
        for agent_dir in subdirs(self.root / "index"):
            for entry in agent_dir.glob("*.json"):
                try:
                    sha256 = str(json.loads(entry.read_bytes())["sha256"])
                except (OSError, ValueError, KeyError) as exc:
                    self._found("missing_object", entry, f"an unreadable index entry: {exc}",
                                self.repair and self._quarantine(entry, "index"))
                    continue
                indexed.setdefault(sha256, []).append(entry)
        return indexed

    # -- objects/ ----------------------------------------------------------------------------------

    def _objects(self, indexed: dict[str, list[Path]]) -> None:
        seen: set[str] = set()
        for fan in subdirs(self.root / "objects"):
            for path in fan.iterdir():
                if path.is_file() and len(path.name) == 64 and set(path.name) <= HEX:
                    seen.add(path.name)
                    self._object(path, indexed)
        for sha256, entries in indexed.items():
            if sha256 not in seen:
                for entry in entries:
                    self._found("missing_object", entry, f"names object {sha256}, which is not in the store",
                                self.repair and self._quarantine(entry, "index"))

    def _object(self, path: Path, indexed: dict[str, list[Path]]) -> None:
        sha256 = path.name
        self.report.objects_checked += 1
        actual, _size = hash_file(path)
        if actual != sha256:
            self._found("bad_object", path, f"its bytes hash to {actual}", self.repair and self._quarantine(path))
            for entry in indexed.pop(sha256, []):   # now without an object
                self._found("missing_object", entry, f"names object {sha256}, whose bytes are altered",
                            self.repair and self._quarantine(entry, "index"))
            return
        copies = sorted(path.parent.glob(f"{sha256}.*.manifest.json"))
        if sha256 in indexed:
            for copy in copies:   # a copy whose index was never written (a crash after the copy)
                self._index_from_copy(sha256, copy, indexed[sha256])
            return
        if copies:
            for copy in copies:
                self._index_from_copy(sha256, copy, [])
            return
        self._found("orphan_object", path, "no index entry or manifest names it",
                    self.repair and self._quarantine(path))

    def _index_from_copy(self, sha256: str, copy: Path, entries: list[Path]) -> None:
        agent, file_id = copy.name[len(sha256) + 1:-len(".manifest.json")].rsplit(".", 1)
        if any(entry.parent.name == agent and entry.stem == file_id for entry in entries):
            return
        if self.store.stored(agent, file_id) is not None:
            return   # the same file id was stored later with other bytes: this copy is history
        repaired = False
        if self.repair:
            doc = json.loads(copy.read_bytes())
            index = self.root / "index" / agent / f"{file_id}.json"
            make_dirs(index.parent)
            atomic_write(index, json.dumps(
                {"agent_id": agent, "file_id": file_id, "sha256": sha256, "size": doc["size"], "stored_ms": now_ms(),
                 "object": str(self.store.object_path(sha256).relative_to(self.root))}).encode(), mode=0o444)
            repaired = True
        self._found("index_from_manifest", copy, f"{agent}/{file_id} is stored but not indexed", repaired)

    # -- leftovers ---------------------------------------------------------------------------------

    def _temp_files(self) -> None:
        for sub in ("objects", "index", "rejected", "incoming"):
            for path in (self.root / sub).rglob(".*.tmp-*"):
                if path.is_file():
                    self._found("temp_file", path, "left by a crash", self.repair and self._remove(path))

    def _remove(self, path: Path) -> bool:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            os.unlink(path)
        fsync_dir(path.parent)
        return True

    def _quarantine(self, path: Path, kind: str = "objects") -> bool:
        """Move `path` under quarantine/<kind>/, keeping its path below objects/ or index/."""
        below = path.relative_to(self.root).parts[1:]
        target = self.root / "quarantine" / kind / Path(*below)
        make_dirs(target.parent)
        os.replace(path, target)
        fsync_dir(path.parent)
        fsync_dir(target.parent)
        return True


def check_store(root: Path, *, repair: bool = False) -> FsckReport:
    """Check (and with `repair`, repair) the receiver store at `root`; see the module docstring."""
    return StoreCheck(root, repair=repair).run()
