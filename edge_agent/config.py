"""Typed, validated agent configuration (DESIGN.md section 9).

`load_config(path)` returns an `AgentConfig` or raises `ConfigError`, whose
`problems` name each bad key, the value found and what would be valid.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.toml")
CONFIG_ENV = "EDGE_AGENT_CONFIG"

# R11: monitoring devices may never be placed in these kinds of places.
FORBIDDEN_LOCATION_KINDS = frozenset(
    {"hotel_room", "dormitory", "bathroom", "changing_room", "toilet", "nursing_room"}
)
ALLOWED_LOCATION_KINDS = frozenset(
    {"street", "intersection", "road", "square", "market", "office", "entrance", "parking",
     "station", "vehicle", "indoor_public", "other"}
)

# An id becomes an MQTT client id and a topic segment: no wildcards, no slashes.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TOPIC_ROOT_PATTERN = r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$"
# A GB/T 28181 code ([gb28181], cameras' gb_id): 20 decimal digits (centre 8, industry 2, type 3, net 1, serial 6).
GB_ID_PATTERN = r"^[0-9]{20}$"


def _pem_certificates(path: Path | None) -> Path | None:
    """A trust-anchor file must be readable and hold at least one PEM certificate."""
    if path is None:
        return None
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path} ({exc.strerror}); give the CA certificate file (PEM)") from None
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give the CA certificate")
    return path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Section):
    id: Annotated[str, Field(pattern=ID_PATTERN)]
    site: Annotated[str, Field(min_length=1, max_length=128)]
    unit: Annotated[str, Field(min_length=1, max_length=256)]
    data_dir: Path = Path("/var/lib/edge-agent")
    max_disk_gb: Annotated[float, Field(gt=0)] = 500
    recorders_file: Path | None = None
    ingest_workers: Annotated[int, Field(ge=1, le=32)] = 4
    verify_readback: bool = True
    min_free_mb: Annotated[int, Field(ge=0)] = 512
    timezone: str = "Asia/Shanghai"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as 'Asia/Shanghai'") from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The agent's time zone: file-name times, ISO strings in manifests, schedules and the CLI's times."""
        return ZoneInfo(self.timezone)


class MqttSection(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    root: Annotated[str, Field(pattern=TOPIC_ROOT_PATTERN)] = "evidence/v2"
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    chunk_kib: Annotated[int, Field(ge=4, le=8192)] = 512   # fits a 1 MB broker packet limit (DESIGN-CHANGES)
    # Chunks unacked by the receiver, within the share its acks state (docs/DESIGN-CHANGES.md): 128 MiB at 512 KiB,
    # held at the broker and the receiver; the agent's paho holds at most CHUNKS_IN_CLIENT of them.
    window: Annotated[int, Field(ge=1, le=1024)] = 256
    files_in_flight: Annotated[int, Field(ge=1, le=64)] = 8   # files sent at once, so small ones don't queue
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    ack_timeout_s: Annotated[float, Field(gt=0, le=600)] = 15
    session_expiry_s: Annotated[int, Field(ge=0)] = 7 * 24 * 3600
    bandwidth_kbps: Annotated[int, Field(gt=0)] | None = None
    # While a dock bay is collecting, the uplink sends its chunks at most at yield_to_docks_kbps (0: holds them),
    # for up to yield_to_docks_s at a stretch (0: never yields), so the recorders are safe to take about as soon
    # as ingest alone would make them while the uplink still makes progress: on a small workstation ingest and
    # upload compete for the same cores (scripts/bench_dock_day.py, docs/BENCHMARKS.md). Acks, commands and
    # events always flow.
    yield_to_docks_s: Annotated[float, Field(ge=0, le=86400)] = 0   # docs/OPERATIONS.md
    yield_to_docks_kbps: Annotated[int, Field(ge=0)] = 0
    reconnect_min_s: Annotated[float, Field(gt=0)] = 1
    reconnect_max_s: Annotated[float, Field(gt=0)] = 120
    command_keys: Path | None = None
    # Inbound payload caps, checked before parsing: an ack carries `have` ranges (a badly fragmented file's
    # may be long), a command is a few hundred bytes. Larger messages are dropped and counted.
    max_ack_kib: Annotated[int, Field(ge=1, le=65536)] = 1024
    max_command_kib: Annotated[int, Field(ge=1, le=1024)] = 16
    # The same file answered this many times with an ack the agent cannot use: alarm `sync_incompatible`.
    incompatible_acks: Annotated[int, Field(ge=1, le=1000)] = 5
    # The platform's receiver public keys (a PEM file or a directory of *.pem): a `complete` ack counts only
    # with a receipt signed by one of them (docs/PROTOCOL.md, Receipts). Unset: nothing is ever synced. Read
    # afresh at every check; a path that does not exist stops the uplink at start (ConfigError).
    receiver_keys: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> MqttSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both for client certificates, or neither")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert needs tls_ca, the CA that signed the broker's certificate")
        return self


class _DockBase(_Section):
    name: Annotated[str, Field(pattern=ID_PATTERN)]
    clear_after_sync: bool = False
    verify_before_clear: bool = True   # re-hash the recorder's file before deleting it
    slots: Annotated[int, Field(ge=1, le=256)] = 20
    settle_s: Annotated[float, Field(ge=0, le=3600)] = 2.0  # files younger than this may still be written
    rescan_s: Annotated[float, Field(gt=0, le=3600)] = 5.0


class UsbDockSection(_DockBase):
    kind: Literal["usb"]
    mount_root: Path = Path("/media/edge-dock")
    # R8: a USB mass-storage device not in recorders.toml is read as an unknown recorder with an alarm
    # ("ingest"), or never read, with an alarm naming its vendor, product and serial ("refuse").
    unknown_devices: Literal["ingest", "refuse"] = "ingest"


class DirectoryDockSection(_DockBase):
    kind: Literal["directory"]
    root: Path


Dock = Annotated[UsbDockSection | DirectoryDockSection, Field(discriminator="kind")]


class Camera(_Section):
    name: Annotated[str, Field(pattern=ID_PATTERN)]
    onvif: str | None = None
    rtsp: str | None = None
    profile: str | None = None
    username: str | None = None
    password_file: Path | None = None
    segment_s: Annotated[int, Field(ge=2, le=3600)] = 60
    stall_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10
    image_check_s: Annotated[float, Field(gt=0)] = 5
    reconnect_max_s: Annotated[float, Field(gt=0, le=3600)] = 30   # backoff ceiling between reconnects
    # Once the camera's reader has read all that came, it sleeps this long (less for streams above about
    # 2 Mbit/s, so that at most 64 kB wait in the socket) and then reads what gathered in one go: a quarter of the
    # wake-ups and half the CPU (docs/BENCHMARKS.md "Reads paced"); packets reach the disk up to this much later.
    # 0: each packet is read as it comes.
    read_pace_ms: Annotated[int, Field(ge=0, le=1000)] = 250
    # ONVIF cameras: how often the camera's clock is read besides every (re)connect, and whether its tamper
    # events (PullPoint) become alarms.
    clock_check_s: Annotated[float, Field(gt=0, le=86400)] = 600
    onvif_events: bool = True
    location: Annotated[str, Field(min_length=1)]
    location_kind: str
    gb_id: Annotated[str, Field(pattern=GB_ID_PATTERN)] | None = None   # its GB/T 28181 channel id ([gb28181])
    # Camera-signed video (docs/CAMERAS.md "Camera-signed video"): the CA certificate(s), PEM, that a signing
    # camera's certificate must lead to; unset: `evidence.camera_signing_ca`, and if that is unset too,
    # signatures are checked for integrity only and segments say `unverifiable`.
    signing_ca: Path | None = None

    @field_validator("signing_ca")
    @classmethod
    def _signing_ca(cls, value: Path | None) -> Path | None:
        return _pem_certificates(value)

    @field_validator("location_kind")
    @classmethod
    def _privacy(cls, value: str) -> str:
        if value in FORBIDDEN_LOCATION_KINDS:
            raise ValueError(
                f"monitoring devices may not be placed in a {value} (R11: hotel rooms, dormitories, "
                "bathrooms, changing rooms, toilets and nursing rooms are refused); remove this camera"
            )
        if value not in ALLOWED_LOCATION_KINDS:
            raise ValueError(f"unknown location kind; valid: {', '.join(sorted(ALLOWED_LOCATION_KINDS))}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Camera:
        if (self.onvif is None) == (self.rtsp is None):
            raise ValueError("set exactly one of onvif (device service URL) or rtsp (stream URL)")
        url = self.onvif or self.rtsp or ""
        scheme = "http" if self.onvif else "rtsp"
        if not url.startswith((f"{scheme}://", f"{scheme}s://")):
            raise ValueError(f"{'onvif' if self.onvif else 'rtsp'} must be a {scheme}:// URL, got {url!r}")
        return self


# -- GB/T 28181 device mode ([gb28181]; edge_agent/sources/gb28181) --------------------------------------------

class Gb28181Section(_Section):
    """The gateway as a GB/T 28181 device registered with a platform's SIP server (docs/CAMERAS.md)."""

    enabled: bool = False
    server_id: Annotated[str, Field(pattern=GB_ID_PATTERN)] | None = None   # the platform's SIP id
    domain: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9.-]+$")] | None = None
    server_host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    server_port: Annotated[int, Field(ge=1, le=65535)] = 5060
    device_id: Annotated[str, Field(pattern=GB_ID_PATTERN)] | None = None   # this gateway's id
    password: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    password_file: Path | None = None           # instead of password: a file of mode 0600 holding it
    local_host: str = "0.0.0.0"
    local_port: Annotated[int, Field(ge=0, le=65535)] = 5060   # 0: any free port (tests)
    expires_s: Annotated[int, Field(ge=60, le=86400)] = 3600
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 60
    keepalive_misses: Annotated[int, Field(ge=1, le=20)] = 3   # unanswered keepalives before re-registering
    charset: Literal["GB2312", "UTF-8"] = "GB2312"
    unregistered_alarm_s: Annotated[float, Field(ge=0, le=86400)] = 300   # alarm after this long unregistered
    name: Annotated[str, Field(min_length=1, max_length=64)] = "edge-agent gateway"

    @model_validator(mode="after")
    def _complete(self) -> Gb28181Section:
        if not self.enabled:
            return self
        missing = [k for k in ("server_id", "domain", "device_id") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"enabled = true needs {', '.join(missing)} in [gb28181]; see "
                             "config/agent.example.toml")
        if (self.password is None) == (self.password_file is None):
            raise ValueError("set exactly one of password or password_file (a file of mode 0600) in [gb28181]")
        return self

    def read_password(self) -> str:
        """The SIP password: `password`, or `password_file`'s first line (refused unless mode 0600 or 0400)."""
        if self.password is not None:
            return self.password
        assert self.password_file is not None
        try:
            mode = self.password_file.stat().st_mode & 0o777
            if mode & 0o077:
                raise PermissionError(f"{self.password_file} has mode {mode:o}: run chmod 600 {self.password_file} "
                                      "(the GB/T 28181 password must not be readable by others)")
            lines = self.password_file.read_text("utf-8").splitlines()
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as exc:
            problem = Problem("gb28181.password_file", str(self.password_file),
                              f"cannot be read ({exc}); write the password in it")
            raise ConfigError(self.password_file, [problem]) from None
        if not lines or not lines[0].strip():
            raise ConfigError(self.password_file, [Problem("gb28181.password_file", str(self.password_file),
                                                           "is empty; write the password on its first line")])
        return lines[0].strip()


class RetentionSection(_Section):
    routine_days: Annotated[int, Field(ge=180)] = 180
    disk_purge_percent: Annotated[float, Field(gt=0, le=100)] = 85
    check_s: Annotated[float, Field(gt=0)] = 600          # how often retention and disk pressure are checked


class HealthSection(_Section):
    interval_s: Annotated[float, Field(gt=0)] = 30
    unsynced_alarm_h: Annotated[float, Field(gt=0)] = 24
    clock_offset_alarm_ms: Annotated[int, Field(gt=0)] = 2000
    disk_alarm_percent: Annotated[float, Field(gt=0, le=100)] = 90
    scrub_mb_s: Annotated[float, Field(gt=0)] = 20
    scrub_interval_h: Annotated[float, Field(gt=0)] = 24   # pause between full scrub passes
    change_check_s: Annotated[float, Field(gt=0)] = 2      # how often health looks for a change worth publishing
    summary_hour: Annotated[int, Field(ge=0, le=23)] = 23  # local hour of the daily summary event
    # The agent's own clock (R9, kernel adjtimex): alarm `clock_unsynchronized` while the kernel says it is not
    # synchronised or its maximum error exceeds clock_error_alarm_ms. Turn off only on a box without time source.
    clock_sync_alarm: bool = True
    clock_error_alarm_ms: Annotated[int, Field(gt=0)] = 1000


class LivenessSection(_Section):
    """The component supervisor (edge_agent/ops/liveness.py): how often it looks, and how long a loop that is
    not idle may go without a heartbeat before it counts as stuck (longer than the longest scrub slice or
    retention pass)."""

    check_s: Annotated[float, Field(gt=0, le=600)] = 5
    stall_s: Annotated[float, Field(gt=0, le=86400)] = 300


class EvidenceSection(_Section):
    """Signed documents (docs/PROTOCOL.md section 10): how often the agent signs a checkpoint of its audit
    head and chain head (also before every recorder clear; not when nothing changed since the last one)."""

    checkpoint_s: Annotated[float, Field(ge=1, le=86400)] = 300
    # RFC 3161 time-stamping authority for checkpoints (docs/PROTOCOL.md section 10); unset: none.
    tsa_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    tsa_ca: Path | None = None            # its root certificate (PEM): `verify` checks tokens' signatures
    tsa_timeout_s: Annotated[float, Field(gt=0, le=120)] = 10
    # Trust anchor(s), PEM, for camera-signed video of every camera without its own `signing_ca`.
    camera_signing_ca: Path | None = None

    @field_validator("camera_signing_ca")
    @classmethod
    def _camera_signing_ca(cls, value: Path | None) -> Path | None:
        return _pem_certificates(value)


class CryptoSection(_Section):
    """The agent's signing suite (docs/PROTOCOL.md "Crypto suites"): `ed25519`, `sm2` (国密: SM2 signatures with
    SM3, SM3 file digests) or both (`ed25519+sm2`). Changing it takes effect through a key rotation, which the
    daemon does at start (or `edge-agent keys rotate`)."""

    suite: Literal["ed25519", "sm2", "ed25519+sm2"] = "ed25519"


class UiSection(_Section):
    """The status page at the dock (edge_agent/ui): read-only, on loopback unless `listen` says otherwise."""

    enabled: bool = False
    listen: str = "127.0.0.1:8470"                  # host:port; port 0 takes a free one (tests)
    language: Literal["en", "zh_CN"] | None = None  # None: from the locale (LANG=zh_CN.UTF-8 gives Chinese)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port; write it like 127.0.0.1:8470")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class ReceiverSection(_Section):
    store_dir: Path = Path("/var/lib/edge-receiver")   # objects/, index/, incoming/ (shared by receivers)
    keys_dir: Path = Path("/etc/edge-receiver/agents")  # <agent_id>.pem: each enrolled agent's public key
    shared_subscription: bool = False                   # $share/receivers/...: several receivers, one load
    client_id: Annotated[str, Field(pattern=ID_PATTERN)] = "receiver-1"
    max_file_gb: Annotated[float, Field(gt=0)] = 64
    max_chunk_kib: Annotated[int, Field(ge=4, le=65536)] = 8192
    ack_every_chunks: Annotated[int, Field(ge=1, le=16)] = 16
    ack_interval_ms: Annotated[int, Field(ge=10, le=500)] = 500
    session_expiry_s: Annotated[int, Field(ge=0)] = 24 * 3600
    # Limits (docs/OPERATIONS.md "Receiver limits"): beyond them a new transfer is answered `receiving`/`busy`.
    max_open_transfers_per_agent: Annotated[int, Field(ge=1)] = 64
    max_reserved_gb_per_agent: Annotated[float, Field(gt=0)] = 256   # sum of the sizes of its open transfers
    # One agent's messages queued in memory before the rest are dropped (each ack tells the agent, `max_queued_bytes`)
    max_queued_mib_per_agent: Annotated[float, Field(gt=0, le=4096)] = 192
    min_free_gb: Annotated[float, Field(ge=0)] = 5                   # free space kept on the store's disk
    incoming_expiry_days: Annotated[float, Field(gt=0)] = 7          # an untouched transfer is dropped after
    signing_key_dir: Path | None = None   # the receiver's Ed25519 receipt key; default <store_dir>/keys

    @property
    def receipt_key_dir(self) -> Path:
        return self.signing_key_dir or self.store_dir / "keys"


class AgentStoreSection(_Section):
    """Encryption at rest of the agent's store and staging (edge_agent/atrest.py, docs/OPERATIONS.md "Encryption
    at rest"): off unless `encrypt` names an algorithm. `key_file`: the 256-bit store key (64 hex digits, mode
    0600, outside the data dir); under systemd the credential `edge-agent.store-key` (LoadCredential=) wins. Files
    already encrypted stay readable with encryption turned off, as long as the key is still configured."""

    encrypt: Literal["sm4-gcm", "aes-256-gcm"] | None = None
    key_file: Path | None = None


class AgentConfig(_Section):
    agent: AgentSection
    mqtt: MqttSection = MqttSection()
    docks: list[Dock] = []
    cameras: list[Camera] = []
    retention: RetentionSection = RetentionSection()
    health: HealthSection = HealthSection()
    liveness: LivenessSection = LivenessSection()
    evidence: EvidenceSection = EvidenceSection()
    ui: UiSection = UiSection()
    gb28181: Gb28181Section = Gb28181Section()
    crypto: CryptoSection = CryptoSection()
    store: AgentStoreSection = AgentStoreSection()

    @model_validator(mode="after")
    def _gb_ids(self) -> AgentConfig:
        """Every GB id used once; with [gb28181] enabled, the cameras without a gb_id are not offered."""
        ids = [c.gb_id for c in self.cameras if c.gb_id is not None] + [self.gb28181.device_id]
        seen: set[str] = set()
        for gb_id in filter(None, ids):
            if gb_id in seen:
                raise ValueError(f"GB/T 28181 id {gb_id} is used twice (gb28181.device_id, cameras' gb_id): "
                                 "give each camera and the gateway its own 20-digit id")
            seen.add(gb_id)
        return self

    @model_validator(mode="after")
    def _key_outside_data_dir(self) -> AgentConfig:
        key_file = self.store.key_file
        if key_file is not None and os.path.realpath(key_file).startswith(
                os.path.realpath(self.agent.data_dir).rstrip("/") + "/"):
            raise ValueError(f"[store] key_file {key_file} is inside data_dir {self.agent.data_dir}: keep the store "
                             "key outside it (e.g. /etc/edge-agent/store.key)")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> AgentConfig:
        for what, items in (("docks", self.docks), ("cameras", self.cameras)):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ValueError(f"{what}: name {item.name!r} is used twice; each needs its own name")
                seen.add(item.name)
        return self

    @property
    def catalog_path(self) -> Path:
        return self.agent.data_dir / "catalog.sqlite"


class StoreSection(_Section):
    """Where the receiver keeps committed files (docs/OPERATIONS.md "Receiver store"): `local`, objects/ and index/
    under receiver.store_dir; or `s3`, a bucket with Object Lock. Transfers in progress: in store_dir, or with
    `transfers = "s3"` in `transfers_bucket` (docs/OPERATIONS.md "Transfers in the object store")."""

    backend: Literal["local", "s3"] = "local"
    endpoint: str | None = None             # https://s3.example.org:9000
    bucket: str | None = None               # created with Object Lock enabled
    region: str = "us-east-1"
    credentials_file: Path | None = None    # access_key_id = … / secret_access_key = …, mode 0600
    tls_ca: Path | None = None              # the CA of the endpoint's certificate; None: the system's
    routine_days: Annotated[int, Field(ge=1, le=36_500)] = 180      # routine files: locked stored + this
    long_term_years: Annotated[int, Field(ge=1, le=100)] = 10       # long_term files: locked stored + this
    # evidence files: locked as routine, plus a legal hold (released only by a platform action)
    release_keys: Path | None = None        # the platform's public key(s) signing legal-hold releases (PEM/dir)
    # Transfers in progress: "local", receiver.store_dir/incoming/; "s3", objects in transfers_bucket (a bucket
    # without Object Lock), so that receivers share nothing but the broker and the store (needs backend = "s3").
    transfers: Literal["local", "s3"] = "local"
    transfers_bucket: str | None = None

    @model_validator(mode="after")
    def _s3_complete(self) -> StoreSection:
        if self.transfers == "s3":
            if self.backend != "s3":
                raise ValueError('transfers = "s3" needs backend = "s3" (the committed files in a bucket too); '
                                 'set backend = "s3" or transfers = "local"')
            if self.transfers_bucket is None:
                raise ValueError('transfers = "s3" needs transfers_bucket: a bucket without Object Lock, not the '
                                 "bucket of committed files; see config/receiver.example.toml")
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.transfers_bucket):
                raise ValueError(f"transfers_bucket {self.transfers_bucket!r} is not an S3 bucket name: 3-63 "
                                 "characters, lower-case letters, digits, dots and hyphens")
            if self.transfers_bucket == self.bucket:
                raise ValueError(f"transfers_bucket {self.transfers_bucket!r} is the bucket of committed files: "
                                 "give a second bucket, created without Object Lock")
        if self.backend != "s3":
            return self
        missing = [k for k in ("endpoint", "bucket", "credentials_file") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"backend = \"s3\" needs {', '.join(missing)} in [store]; see "
                             "config/receiver.example.toml")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.endpoint!r} is not a URL; write it like https://s3.example.org:9000")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.bucket):
            raise ValueError(f"bucket {self.bucket!r} is not an S3 bucket name: 3-63 characters, lower-case "
                             "letters, digits, dots and hyphens")
        return self


class ReceiverConfig(_Section):
    """The reference receiver's config (`edge-agent receiver run --config receiver.toml`)."""

    mqtt: MqttSection = MqttSection()
    receiver: ReceiverSection = ReceiverSection()
    store: StoreSection = StoreSection()
    liveness: LivenessSection = LivenessSection()   # the receiver's threads (platform/receiver/supervise.py)


class FleetSection(_Section):
    """The fleet monitor (`edge-agent fleet serve`): what it keeps and what it calls late."""

    db_path: Path = Path("/var/lib/edge-fleet/fleet.sqlite")   # latest state per agent and recent events
    listen: str = "127.0.0.1:9108"                             # the Prometheus exposition (host:port)
    client_id: Annotated[str, Field(pattern=ID_PATTERN)] = "fleet-monitor"
    stale_intervals: Annotated[float, Field(gt=1)] = 3        # no health for this many of its intervals: stale
    default_interval_s: Annotated[float, Field(gt=0)] = 30    # for snapshots that do not say their interval
    events_per_agent: Annotated[int, Field(ge=1, le=10_000)] = 200   # the newest kept, older ones dropped
    max_agents: Annotated[int, Field(ge=1, le=1_000_000)] = 20_000  # bounds memory and series; more are counted
    max_health_kib: Annotated[int, Field(ge=1, le=65_536)] = 256     # larger payloads are dropped before parsing
    max_event_kib: Annotated[int, Field(ge=1, le=4096)] = 16
    regression_hold_h: Annotated[float, Field(gt=0)] = 24      # a head regression stays flagged this long
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 1  # state reaches SQLite at most this late
    session_expiry_s: Annotated[int, Field(ge=0)] = 3600


class FleetConfig(_Section):
    """The fleet monitor's config (`edge-agent fleet serve --config fleet.toml`): [mqtt] and [fleet]."""

    mqtt: MqttSection = MqttSection()
    fleet: FleetSection = FleetSection()


@dataclass(frozen=True)
class Problem:
    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is _MISSING else f" = {self.value!r}"
        return f"{self.key}{shown}: {self.message}"


_MISSING = object()


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason."""

    def __init__(self, path: Path | str, problems: list[Problem]):
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"invalid configuration {self.path}:\n{lines}")


def _key_of(loc: tuple[Any, ...], data: Any) -> tuple[str, Any]:
    parts: list[str] = []
    value: Any = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("usb", "directory") and parts and parts[-1].startswith("["):
            continue  # the discriminator's branch name is not a key the user wrote
        elif isinstance(item, str) and item.startswith(("function-", "model-")):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
        if isinstance(item, int) and isinstance(value, list) and item < len(value):
            value = value[item]
        elif isinstance(value, dict) and isinstance(item, str) and item in value:
            value = value[item]
        elif not (isinstance(item, str) and item in ("usb", "directory")):
            value = _MISSING
    return "".join(parts) or "(top level)", value


def _message(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key (misspelt?); remove it or check DESIGN.md section 9"
    elif err["type"] == "union_tag_invalid":
        msg = "kind must be one of: usb, directory"
    elif err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == ID_PATTERN:
        msg = ("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
               "(it becomes an MQTT client id and topic segment)")
    elif err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == TOPIC_ROOT_PATTERN:
        msg = "must be topic levels of letters, digits, '.', '_' or '-' separated by '/', no wildcards"
    elif err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == GB_ID_PATTERN:
        msg = "must be a GB/T 28181 code: exactly 20 digits, e.g. 34020000001320000001"
    elif err["type"] == "union_tag_not_found":
        msg = "kind is required: usb or directory"
    return msg


Model = TypeVar("Model", bound=BaseModel)


def _validated(model: type[Model], data: dict[str, Any], source: Path | str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key, value = _key_of(err["loc"], data)
            if err["type"].startswith("union_tag_") and isinstance(value, dict):  # name the bad `kind` itself
                key, value = f"{key}.kind", value.get("kind", _MISSING)
            problems.append(Problem(key, value, _message(err)))
        raise ConfigError(source, problems) from None


def parse_config(data: dict[str, Any], source: Path | str = "<config>") -> AgentConfig:
    return _validated(AgentConfig, data, source)


def parse_receiver_config(data: dict[str, Any], source: Path | str = "<config>") -> ReceiverConfig:
    return _validated(ReceiverConfig, data, source)


def parse_fleet_config(data: dict[str, Any], source: Path | str = "<config>") -> FleetConfig:
    return _validated(FleetConfig, data, source)


def load_fleet_config(path: Path | str) -> FleetConfig:
    return parse_fleet_config(_read_toml(Path(path)), path)


def resolve_config_path(path: Path | str | None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path | str | None = None) -> AgentConfig:
    cfg_path = resolve_config_path(path)
    return parse_config(_read_toml(cfg_path), cfg_path)


def load_receiver_config(path: Path | str) -> ReceiverConfig:
    return parse_receiver_config(_read_toml(Path(path)), path)


def _read_toml(cfg_path: Path) -> dict[str, Any]:
    try:
        raw = cfg_path.read_bytes()
    except OSError as exc:
        raise ConfigError(cfg_path, [Problem("(file)", _MISSING, f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(cfg_path, [Problem("(file)", _MISSING, f"not UTF-8 at byte {exc.start}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(cfg_path, [Problem("(syntax)", _MISSING, str(exc))]) from None
    return data
