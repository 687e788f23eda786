"""`edge-agent receiver run`: the reference receiver (central side of the wire protocol); `receiver fsck`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import ReceiverConfig
from edge_agent.services.workspace import ServiceError


def serve(config: ReceiverConfig) -> None:
    """Run a receiver until SIGTERM. Several may share one store and a shared subscription."""
    from edge_agent.platform.receiver import Receiver  # the platform side: not loaded by every CLI command

    try:
        receiver = Receiver(config)
    except OSError as exc:
        raise ServiceError(f"cannot open the receiver store {config.receiver.store_dir}: {exc.strerror}",
                           code=2) from exc
    receiver.run_forever()


@dataclass(frozen=True)
class FsckResult:
    """What `receiver fsck` found (and repaired) in a receiver store."""

    store: str
    objects_checked: int
    findings: list[dict[str, Any]]
    clean: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fsck(store_dir: Path, *, repair: bool = False) -> FsckResult:
    """Check a receiver store: half-committed transfers, orphans, objects whose bytes do not hash to their name,
    index entries without objects; with `repair`, repair each (objects are quarantined, never deleted).
    Run it with the store's receivers stopped."""
    from edge_agent.platform.receiver import check_store  # the platform side: not loaded by every CLI command

    if not (Path(store_dir) / "objects").is_dir():
        raise ServiceError(f"{store_dir} is not a receiver store (no objects/ in it): give --store the "
                           "receiver's store_dir", code=2)
    try:
        report = check_store(Path(store_dir), repair=repair)
    except OSError as exc:
        raise ServiceError(f"cannot check the receiver store {store_dir}: {exc}", code=2) from exc
    return FsckResult(report.store, report.objects_checked, [asdict(f) for f in report.findings], report.clean)
