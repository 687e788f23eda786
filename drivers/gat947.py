"""The GA/T 947.4 recorder handshake: a docked body-worn recorder's vendor library, called through ctypes.

Docking stations built to GA/T 947 talk to a recorder through its maker's shared library before the recorder
shows up as USB mass storage: initialise it, read its ID code (maker/model) and its record (serial, officer
number 警号 and name, unit number and name), read its battery and its clock, set its clock (校时) and switch
it to mass storage (a password-gated `SetMSDC`). Makers ship the same calls under their own names; each
model's table entry in `recorders.toml` (`[models.gat947]`) names the library, the functions and the layout
of the record (`Gat947Settings`). The C interface (docs/OPERATIONS.md, "GA/T 947.4 handshake"): every call
returns non-zero on success and writes the vendor's error code to its last argument, `int *iRet`:

    int init(char *id_code, int *iRet)                       Init_Device: ID code into id_code
    int id_code(char *id_code, int *iRet)                    GetIDCode (optional: else init's)
    int info(ZFYINFO *info, char *password, int *iRet)       GetZFYInfo: fixed-width fields, `info_layout`
    int battery(int *percent, char *password, int *iRet)     ReadDeviceBatteryDumpEnergy
    int read_time(char *yyyymmddhhmmss, char *password, int *iRet)    the recorder's local time
    int set_time(char *password, int *iRet)                  SyncDevTime: the recorder takes the host's time
    int mass_storage(char *password, int *iRet)              SetMSDC

`handshake()` runs them in that order and never raises: a library that cannot be loaded or a call that
fails is written into the report's `errors` and the next step is tried (only a failed `init` ends it),
so the dock falls back to USB identification and ingest goes on. The recorder's clock offset is measured
before any correction and handed to `before_correction` (which records it durably) before `set_time` runs.
A vendor library is not assumed thread-safe: calls into one library are serialised.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from zoneinfo import ZoneInfo

log = logging.getLogger(__name__)

PROTOCOL = "gat947"

# The functions' names in common GA/T 947.4 vendor SDKs; each model's table may rename any of them.
DEFAULT_FUNCTIONS: dict[str, str] = {
    "init": "Init_Device", "id_code": "GetIDCode", "info": "GetZFYInfo", "battery": "ReadDeviceBatteryDumpEnergy",
    "read_time": "ReadDeviceTime", "set_time": "SyncDevTime", "mass_storage": "SetMSDC",
}
# The recorder record's fixed-width fields, in order, with their byte sizes (the vendor's ZFYINFO struct).
DEFAULT_INFO_LAYOUT: dict[str, int] = {"serial": 8, "officer_id": 10, "officer_name": 32, "unit_id": 16,
                                       "unit_name": 64}
INFO_FIELDS = ("serial", "officer_id", "officer_name", "unit_id", "unit_name")
ID_CODE_BYTES = 64
TIME_BYTES = 32

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class Gat947Settings:
    """One recorder model's vendor library, as `recorders.toml` gives it."""

    library: str
    password: str = ""
    set_time: bool = True                   # 校时: set the recorder's clock to the agent's at every docking
    low_battery_percent: int = 20           # below this, the alarm recorder_battery_low
    encoding: str = "gbk"                   # of the record's text fields
    functions: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_FUNCTIONS))
    info_layout: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_INFO_LAYOUT))


@dataclass(frozen=True)
class RecorderHandshake:
    """What a recorder said of itself through its vendor interface at docking (drivers/gat947.py).

    `clock_offset_ms` is the recorder's clock minus the agent's, measured before any correction (at agent
    time `clock_read_ms`); `clock_set` whether it was then set (校时), `clock_offset_after_ms` re-read after.
    `errors`: each step that failed, in words; with no `serial` the recorder is identified by USB instead."""

    protocol: str
    library: str
    id_code: str | None = None
    serial: str | None = None
    officer_id: str | None = None
    officer_name: str | None = None
    unit_id: str | None = None
    unit_name: str | None = None
    battery_percent: int | None = None
    low_battery_percent: int | None = None   # the model's threshold: below it, the alarm recorder_battery_low
    clock_offset_ms: int | None = None
    clock_read_ms: int | None = None
    clock_set: bool = False
    clock_offset_after_ms: int | None = None
    mass_storage: bool = False
    errors: tuple[str, ...] = ()

    @property
    def battery_low(self) -> bool:
        return (self.battery_percent is not None and self.low_battery_percent is not None
                and self.battery_percent < self.low_battery_percent)

    def as_dict(self) -> dict[str, object]:
        """Integers, strings, booleans and lists only: it goes into the signed session manifest."""
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name, value in self.__dict__.items()}


class HandshakeStepFailed(Exception):
    """One vendor call refused or failed: the step and the vendor's error code."""


class Gat947Library:
    """The vendor library of one recorder model, loaded with ctypes; one method per call of the interface."""

    def __init__(self, settings: Gat947Settings):
        self.settings = settings
        self._lib = ctypes.CDLL(settings.library)   # OSError when absent or not loadable
        fields = [(name, ctypes.c_char * settings.info_layout[name]) for name in INFO_FIELDS]
        self._info_type = type("ZFYINFO", (ctypes.Structure,), {"_fields_": fields})

    def _call(self, step: str, *args: object) -> None:
        name = self.settings.functions[step]
        try:
            function = getattr(self._lib, name)
        except AttributeError:
            raise HandshakeStepFailed(f"{step}: the library has no function {name}") from None
        error = ctypes.c_int(0)
        function.restype = ctypes.c_int
        if not function(*args, ctypes.byref(error)):
            raise HandshakeStepFailed(f"{step}: {name} failed with vendor error {error.value}")

    def _password(self) -> bytes:
        return self.settings.password.encode(self.settings.encoding, errors="replace")

    def _text(self, raw: bytes) -> str | None:
        value = raw.split(b"\0", 1)[0].decode(self.settings.encoding, errors="replace").strip()
        return value or None

    def init(self) -> str | None:
        buf = ctypes.create_string_buffer(ID_CODE_BYTES)
        self._call("init", buf)
        return self._text(buf.raw)

    def id_code(self) -> str | None:
        buf = ctypes.create_string_buffer(ID_CODE_BYTES)
        self._call("id_code", buf)
        return self._text(buf.raw)

    def info(self) -> dict[str, str | None]:
        record = self._info_type()
        self._call("info", ctypes.byref(record), self._password())
        return {name: self._text(getattr(record, name)) for name in INFO_FIELDS}

    def battery(self) -> int:
        percent = ctypes.c_int(-1)
        self._call("battery", ctypes.byref(percent), self._password())
        return percent.value

    def read_time(self) -> str:
        buf = ctypes.create_string_buffer(TIME_BYTES)
        self._call("read_time", buf, self._password())
        return buf.value.decode("ascii", errors="replace")

    def set_time(self) -> None:
        self._call("set_time", self._password())

    def mass_storage(self) -> None:
        self._call("mass_storage", self._password())


def _lock_for(library: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(library, threading.Lock())


def _offset_ms(lib: Gat947Library, zone: ZoneInfo) -> tuple[int, int]:
    """(the recorder's clock minus the agent's in ms, the agent's time of the read in ms). The recorder tells
    whole seconds: the offset is exact to about a second."""
    before = time.time()
    text = lib.read_time()
    after = time.time()
    try:
        recorder = datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=zone).timestamp()
    except ValueError:
        raise HandshakeStepFailed(f"read_time: the recorder's time {text!r} is not YYYYMMDDhhmmss") from None
    host = (before + after) / 2
    # The recorder's second started somewhere in the second it shows: compare with its middle.
    return round((recorder + 0.5 - host) * 1000), round(host * 1000)


def handshake(settings: Gat947Settings, zone: ZoneInfo,
              before_correction: Callable[[RecorderHandshake], None]) -> RecorderHandshake:
    """Talk to the docked recorder through its vendor library; never raises (see the module's docstring)."""
    report = RecorderHandshake(protocol=PROTOCOL, library=settings.library,
                               low_battery_percent=settings.low_battery_percent)
    errors: list[str] = []
    with _lock_for(settings.library):
        try:
            lib = Gat947Library(settings)
        except OSError as exc:
            return replace(report, errors=(f"library {settings.library} cannot be loaded: {exc}",))
        try:
            id_code = lib.init()
        except HandshakeStepFailed as exc:
            return replace(report, errors=(str(exc),))
        steps: list[tuple[str, Callable[[], dict[str, object]]]] = [
            ("id_code", lambda: {"id_code": lib.id_code() or id_code}),
            ("info", lib.info),
            ("battery", lambda: {"battery_percent": lib.battery()}),
        ]
        values: dict[str, object] = {"id_code": id_code}
        for step, run in steps:
            if step == "id_code" and not settings.functions.get("id_code"):
                continue
            try:
                values.update(run())
            except HandshakeStepFailed as exc:
                errors.append(str(exc))
        report = replace(report, **values)   # type: ignore[arg-type]
        try:
            offset, read_ms = _offset_ms(lib, zone)
            report = replace(report, clock_offset_ms=offset, clock_read_ms=read_ms)
        except HandshakeStepFailed as exc:
            errors.append(str(exc))
        if report.clock_offset_ms is not None:
            try:
                before_correction(replace(report, errors=tuple(errors)))
                recorded = True
            except Exception as exc:  # the listener's fault: the clock stays as it was, the handshake goes on
                log.exception("recorder clock offset not recorded library=%s", settings.library)
                errors.append(f"set_time: skipped, the clock offset could not be recorded first ({exc})")
                recorded = False
            if settings.set_time and recorded:
                try:
                    lib.set_time()
                    after, _ = _offset_ms(lib, zone)
                    report = replace(report, clock_set=True, clock_offset_after_ms=after)
                except HandshakeStepFailed as exc:
                    errors.append(str(exc))
        try:
            lib.mass_storage()
            report = replace(report, mass_storage=True)
        except HandshakeStepFailed as exc:
            errors.append(f"{exc} (a wrong password? check the model's gat947.password in recorders.toml)"
                          if "mass_storage" in str(exc) else str(exc))
    report = replace(report, errors=tuple(errors))
    log.info("gat947 handshake library=%s serial=%s officer=%s battery=%s clock_offset_ms=%s clock_set=%s "
             "mass_storage=%s errors=%s", settings.library, report.serial, report.officer_id,
             report.battery_percent, report.clock_offset_ms, report.clock_set, report.mass_storage, len(errors))
    return report
