"""`edge-agent receiver run|keys|fsck`: the reference receiver (central side of the wire protocol), its receipt
key, and the check of its store."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import ReceiverConfig
from edge_agent.i18n import N_
from edge_agent.services.workspace import Result, ServiceError


@dataclass(frozen=True)
class ReceiptKeyInfo(Result):
    """The receiver's receipt key: what every agent pins (`mqtt.receiver_keys`)."""

    key_id: str
    public_key_pem: str
    path: Path                       # the public key's file, to copy onto the agents
    old_key_id: str | None = None    # after a rotation: the key it replaced


def serve(config: ReceiverConfig) -> None:
    """Run a receiver until SIGTERM. Several may share one store and a shared subscription."""
    from edge_agent.platform.receiver import Receiver  # the platform side: not loaded by every CLI command
    from edge_agent.platform.receiver.store import StoreConfigError

    try:
        receiver = Receiver(config)
    except StoreConfigError as exc:
        raise ServiceError.of(exc, code=2) from exc
    except OSError as exc:
        raise ServiceError(N_("cannot open the receiver store {store}: {error}"), code=2,
                           store=config.receiver.store_dir, error=exc.strerror) from exc
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
        raise ServiceError(N_("{store} is not a receiver store (no objects/ in it): give --store the receiver's "
                              "store_dir"), code=2, store=store_dir)
    try:
        report = check_store(Path(store_dir), repair=repair)
    except OSError as exc:
        raise ServiceError(N_("cannot check the receiver store {store}: {error}"), code=2, store=store_dir,
                           error=exc) from exc
    return FsckResult(report.store, report.objects_checked, [asdict(f) for f in report.findings], report.clean)


def fsck_bucket(config: ReceiverConfig) -> FsckResult:
    """Check the receiver's S3 bucket (`[store] backend = "s3"`): every index entry's object is there with the
    index's SHA-256 as the server's checksum, its manifest is there, and it is locked as its class demands.
    Read-only: nothing in a WORM bucket can be repaired."""
    from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings
    from edge_agent.platform.receiver.store import StoreConfigError, StoreUnavailable
    from edge_agent.platform.receiver.worm import check_bucket

    try:
        committed = S3Committed(S3Settings.from_config(config.store))
        committed.check_bucket()
        report = check_bucket(committed)
    except StoreConfigError as exc:
        raise ServiceError.of(exc, code=2) from exc
    except StoreUnavailable as exc:
        raise ServiceError(N_("{error}; run fsck again once the store answers"), code=3, error=exc) from exc
    return FsckResult(report.store, report.objects_checked, [asdict(f) for f in report.findings], report.clean)


def receipt_key(config: ReceiverConfig, *, rotate: bool = False) -> ReceiptKeyInfo:
    """The receipt key (made if the receiver never ran); with `rotate`, a new one replaces it. A running receiver
    signs with a rotated key after its restart: pin the new public key on every agent before that."""
    from edge_agent.platform.receiver.receipts import PUB_FILE, ReceiverKey

    keys_dir = config.receiver.receipt_key_dir
    try:
        old, key = ReceiverKey.rotate(keys_dir) if rotate else (None, ReceiverKey.load_or_create(keys_dir))
    except OSError as exc:
        raise ServiceError(N_("cannot use the receipt key in {keys}: {error}"), code=2, keys=keys_dir,
                           error=exc) from exc
    return ReceiptKeyInfo(key.key_id, key.public_pem(), keys_dir / PUB_FILE, old.key_id if old else None)


def release_hold(config: ReceiverConfig, request_path: Path | None = None, *, agent: str | None = None,
                 file_id: str | None = None) -> dict[str, Any]:
    """Carry out a legal-hold release (`receiver hold release`): the evidence file named loses its legal hold in
    the bucket; its COMPLIANCE retention stays. With `request_path`, on a platform request signed by a key in
    `store.release_keys`, fresh and not a replay; else (`agent`, `file_id`) on a `case_released` annotation for
    the file's case in the agent's chain. Anything else is refused (exit 1)."""
    if config.store.backend != "s3":
        raise ServiceError(N_("legal holds exist in an S3 bucket only: this receiver's [store] backend is "
                              "{backend!r}"), code=2, backend=config.store.backend)
    if (request_path is None) == (agent is None or file_id is None):
        raise ServiceError(N_("give either --request FILE (a signed platform request) or --agent and --file (the "
                              "agent's chain releases the file's case)"), code=2)
    from edge_agent.platform.receiver.keyring import KeyRing
    from edge_agent.platform.receiver.objectstore import S3Committed, S3Settings
    from edge_agent.platform.receiver.service import LEARNED_KEYS
    from edge_agent.platform.receiver.store import StoreConfigError, StoreUnavailable
    from edge_agent.platform.receiver.worm import BucketRecords, CaseReleased, HoldRelease, ReleaseRefused, read_request

    try:
        records = BucketRecords(S3Committed(S3Settings.from_config(config.store)))
        if request_path is not None:
            return HoldRelease(records, config.store.release_keys).release(read_request(request_path))
        keys = KeyRing(config.receiver.keys_dir, config.receiver.store_dir / LEARNED_KEYS)
        return CaseReleased(records, keys.key_for).release(str(agent), str(file_id))
    except StoreConfigError as exc:
        raise ServiceError.of(exc, code=2) from exc
    except ReleaseRefused as exc:
        raise ServiceError(N_("release refused: {error}"), code=1, error=exc) from exc
    except StoreUnavailable as exc:
        raise ServiceError(N_("{error}; run the same release again once the store answers"), code=3,
                           error=exc) from exc
