"""Recorder models, volume identification and safe enumeration of a volume's files.

A volume is identified (DESIGN.md section 9) by the USB serial of its device,
then by an identity file at its root, then by its model's file-name pattern;
failing all, its files are still ingested as `unknown:<label>` and an alarm is
raised. A volume's tree is never trusted: symlinks, `..`, absolute paths and
control characters are refused and never followed out of the volume.

Every regular file on a volume is evidence except what its model's table names
as a system file (`exclude`, with the identity file): a model's `media_globs`
order the copies (recordings first), they never filter them.
"""

from __future__ import annotations

import codecs
import configparser
import fnmatch
import json
import os
import re
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

from drivers.gat947 import DEFAULT_FUNCTIONS, DEFAULT_INFO_LAYOUT, Gat947Settings
from edge_agent.config import ConfigError, Problem

MAX_NAME_BYTES = 255
MAX_DEPTH = 16

# The device id of a volume that said nothing of who it is: this prefix and its volume label.
UNIDENTIFIED_PREFIX = "unknown:"


@dataclass(frozen=True)
class RecorderModel:
    name: str
    vendor_id: int
    product_id: int
    file_pattern: re.Pattern[str] | None = None
    identity_file: str | None = None
    identity_format: str = "ini"
    identity_keys: dict[str, str] = field(default_factory=dict)
    media_globs: tuple[str, ...] = ("**/*",)
    exclude: tuple[str, ...] = ()   # system files (firmware, logs, indexes): never collected, always listed
    gat947: Gat947Settings | None = None   # its GA/T 947.4 vendor library (drivers/gat947.py), if any


def load_models(path: Path | None = None) -> list[RecorderModel]:
    """Read the recorder model table; a bad entry is a ConfigError naming the key."""
    if path is None:
        raw = resources.files("edge_agent").joinpath("data/recorders.toml").read_bytes()
        source = "edge_agent/data/recorders.toml"
    else:
        raw, source = Path(path).read_bytes(), str(path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("(syntax)", None, str(exc))]) from None
    models, problems = [], []
    for i, entry in enumerate(data.get("models", [])):
        try:
            pattern = re.compile(entry["file_pattern"]) if entry.get("file_pattern") else None
            if pattern is not None and "start" not in pattern.groupindex:
                problems.append(Problem(f"models[{i}].file_pattern", entry["file_pattern"],
                                        "needs a named group 'start'"))
            models.append(RecorderModel(
                name=str(entry["name"]), vendor_id=int(entry["vendor_id"]), product_id=int(entry["product_id"]),
                file_pattern=pattern, identity_file=entry.get("identity_file"),
                identity_format=entry.get("identity_format", "ini"),
                identity_keys=dict(entry.get("identity_keys", {})),
                media_globs=tuple(entry.get("media_globs", ["**/*"])),
                exclude=tuple(str(pattern) for pattern in entry.get("exclude", [])),
                gat947=_gat947(entry.get("gat947"), f"models[{i}].gat947", problems),
            ))
        except KeyError as exc:
            problems.append(Problem(f"models[{i}].{exc.args[0]}", None, "required key is missing"))
        except re.error as exc:
            problems.append(Problem(f"models[{i}].file_pattern", entry.get("file_pattern"), f"bad regex: {exc}"))
    if problems:
        raise ConfigError(source, problems)
    return models


_GAT947_KEYS = {"library", "password", "password_file", "set_time", "low_battery_percent", "encoding", "functions",
                "info_layout"}


def _gat947_names(raw: dict[str, Any], where: str,
                  problems: list[Problem]) -> tuple[dict[str, str], dict[str, int]]:
    """The table's function names and record layout over the defaults, each key checked."""
    functions = {**DEFAULT_FUNCTIONS, **raw.get("functions", {})}
    for key in sorted(set(functions) - set(DEFAULT_FUNCTIONS)):
        problems.append(Problem(f"{where}.functions.{key}", functions[key],
                                f"unknown call; valid: {', '.join(DEFAULT_FUNCTIONS)}"))
    layout = {**DEFAULT_INFO_LAYOUT, **raw.get("info_layout", {})}
    for key, size in layout.items():
        if key not in DEFAULT_INFO_LAYOUT:
            problems.append(Problem(f"{where}.info_layout.{key}", size,
                                    f"unknown field; valid: {', '.join(DEFAULT_INFO_LAYOUT)}"))
        elif not isinstance(size, int) or not 1 <= size <= 4096:
            problems.append(Problem(f"{where}.info_layout.{key}", size, "a byte size from 1 to 4096"))
    return functions, layout


def _gat947(raw: Any, where: str, problems: list[Problem]) -> Gat947Settings | None:
    """A model's `[models.gat947]` table (docs/OPERATIONS.md), checked; None when the model has none."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("library"), str) or not raw["library"]:
        problems.append(Problem(f"{where}.library", None, "the vendor library's path is required"))
        return None
    bad = len(problems)
    for key in sorted(set(raw) - _GAT947_KEYS):
        problems.append(Problem(f"{where}.{key}", raw[key], f"unknown key; valid: {', '.join(sorted(_GAT947_KEYS))}"))
    functions, layout = _gat947_names(raw, where, problems)
    encoding = raw.get("encoding", "gbk")
    try:
        codecs.lookup(encoding)
    except LookupError:
        problems.append(Problem(f"{where}.encoding", encoding, "an encoding Python knows, such as gbk or utf-8"))
    percent = raw.get("low_battery_percent", 20)
    if not isinstance(percent, int) or not 0 <= percent <= 100:
        problems.append(Problem(f"{where}.low_battery_percent", percent, "a whole percentage from 0 to 100"))
    password = str(raw.get("password", ""))
    if raw.get("password_file"):
        try:
            password = Path(raw["password_file"]).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(f"{where}.password_file", raw["password_file"], f"unreadable: {exc}"))
    if len(problems) > bad:
        return None
    return Gat947Settings(library=raw["library"], password=password, set_time=bool(raw.get("set_time", True)),
                          low_battery_percent=percent, encoding=encoding, functions=functions, info_layout=layout)


@dataclass(frozen=True)
class VolumeIdentity:
    device_id: str
    method: str  # gat947 (the recorder's vendor handshake) | usb_serial | identity_file | file_pattern | unknown
    model: str | None = None
    serial: str | None = None
    officer_id: str | None = None
    officer_name: str | None = None   # when the identity file names the officer (identity_keys.officer_name)

    @property
    def identified(self) -> bool:
        return self.method != "unknown"


@dataclass(frozen=True)
class FileName:
    """What a recorder's file name tells, per its model's pattern."""

    device: str | None = None
    officer: str | None = None
    start_ms: int | None = None


@dataclass(frozen=True)
class SourceFile:
    path: Path          # absolute, inside the volume
    relative: str       # posix path relative to the volume root
    size: int
    mtime_ns: int
    ctime_ns: int = 0   # changes with any rewrite, even one that keeps size and mtime


@dataclass(frozen=True)
class RefusedEntry:
    relative: str
    reason: str


def _read_identity(volume: Path, model: RecorderModel) -> dict[str, str]:
    if not model.identity_file:
        return {}
    path = volume / model.identity_file
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 * 1024:
            return {}
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    values: dict[str, str] = {}
    if model.identity_format == "json":
        try:
            loaded = json.loads(text)
        except ValueError:
            return {}
        if isinstance(loaded, dict):
            values = {str(k): str(v) for k, v in loaded.items() if isinstance(v, str | int)}
    else:
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # keep key case
        try:
            parser.read_string("[id]\n" + text if not text.lstrip().startswith("[") else text)
        except configparser.Error:
            return {}
        for section in parser.sections():
            values.update(dict(parser[section]))
    out = {}
    for ours, theirs in model.identity_keys.items():
        if values.get(theirs, "").strip():
            out[ours] = values[theirs].strip()
    return out


def parse_name(name: str, model: RecorderModel | None, tz: ZoneInfo) -> FileName:
    if model is None or model.file_pattern is None:
        return FileName()
    match = model.file_pattern.match(name)
    if not match:
        return FileName()
    groups = match.groupdict()
    start_ms = None
    digits = re.sub(r"\D", "", groups.get("start") or "")
    if len(digits) == 14:
        try:
            start = datetime.strptime(digits, "%Y%m%d%H%M%S").replace(tzinfo=tz)
            start_ms = int(start.timestamp() * 1000)
        except ValueError:
            start_ms = None
    return FileName(device=groups.get("device"), officer=groups.get("officer"), start_ms=start_ms)


def identify_volume(volume: Path, label: str, models: list[RecorderModel], *, serial: str | None = None,
                    model_name: str | None = None, sample_names: list[str] | None = None,
                    tz: ZoneInfo) -> tuple[VolumeIdentity, RecorderModel | None]:
    """Identify a docked volume. `serial` and `model_name` come from USB when known."""
    by_name = {m.name: m for m in models}
    candidates = [by_name[model_name]] if model_name in by_name else list(models)
    if serial:
        model = by_name.get(model_name) if model_name else None
        ident = _read_identity(volume, model) if model else {}
        return VolumeIdentity(device_id=serial, method="usb_serial", model=model_name, serial=serial,
                              officer_id=ident.get("officer"), officer_name=ident.get("officer_name")), model
    for model in candidates:
        ident = _read_identity(volume, model)
        if ident.get("device") or ident.get("serial"):
            device = ident.get("device") or ident["serial"]
            return VolumeIdentity(device_id=device, method="identity_file", model=model.name,
                                  serial=ident.get("serial"), officer_id=ident.get("officer"),
                                  officer_name=ident.get("officer_name")), model
    for model in candidates:
        for name in sample_names or []:
            parsed = parse_name(name, model, tz)
            if parsed.device:
                return VolumeIdentity(device_id=parsed.device, method="file_pattern", model=model.name), model
    return VolumeIdentity(device_id=f"{UNIDENTIFIED_PREFIX}{label}", method="unknown"), None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_relative(relative: str) -> str | None:
    """Why a path found on a volume cannot be taken, or None if it is safe."""
    if not relative or relative.startswith("/") or PurePosixPath(relative).is_absolute():
        return "absolute path"
    parts = PurePosixPath(relative).parts
    if not parts:
        return "not a file path ('.' is the volume itself)"
    if any(part in ("..", ".") for part in parts):
        return "path climbs out of the volume ('..')"
    if _CONTROL.search(relative):
        return "control character in file name"
    if any(len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for part in parts):
        return "file name longer than 255 bytes"
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    return None


def walk_volume(volume: Path) -> Iterator[SourceFile | RefusedEntry]:
    """Every regular file under `volume`, without following any symlink.

    Entries that cannot be taken (symlinks, devices, unsafe names) come out as RefusedEntry.
    """
    root = Path(volume)
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            rel = directory.relative_to(root).as_posix()
            yield RefusedEntry(rel or ".", f"cannot list directory: {exc.strerror}")
            continue
        for entry in entries:
            rel = (directory / entry.name).relative_to(root).as_posix()
            problem = check_relative(rel)
            if problem:
                yield RefusedEntry(rel, problem)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                yield RefusedEntry(rel, f"cannot stat: {exc.strerror}")
                continue
            if stat.S_ISLNK(st.st_mode):
                yield RefusedEntry(rel, "symbolic link (never followed off a recorder volume)")
            elif stat.S_ISDIR(st.st_mode):
                if depth + 1 > MAX_DEPTH:
                    yield RefusedEntry(rel, f"directory nested deeper than {MAX_DEPTH} levels")
                else:
                    stack.append((directory / entry.name, depth + 1))
            elif not stat.S_ISREG(st.st_mode):
                yield RefusedEntry(rel, "not a regular file (device, FIFO or socket)")
            else:
                yield SourceFile(path=directory / entry.name, relative=rel, size=st.st_size,
                                 mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)


def excluded_by(relative: str, model: RecorderModel | None) -> str | None:
    """The rule of `model`'s table that makes `relative` a system file (not collected), or None: evidence.

    Exclude patterns match case-insensitively (recorder volumes are FAT: `FIRMWARE.BIN` is `firmware.bin`)."""
    if model is None:
        return None
    if model.identity_file and relative == model.identity_file:
        return f"identity file of model {model.name} ({model.identity_file})"
    folded = relative.casefold()
    for pattern in model.exclude:
        if _matches(folded, (pattern.casefold(),)):
            return f"system file of model {model.name} (exclude {pattern!r})"
    return None


def priority(relative: str, model: RecorderModel | None) -> int:
    """Copy order of a file: the index of the first of its model's `media_globs` it matches (files matching
    none come last). A file's priority never decides whether it is collected."""
    globs = model.media_globs if model else ()
    return next((i for i, pattern in enumerate(globs) if _matches(relative, (pattern,))), len(globs))


def _matches(relative: str, globs: tuple[str, ...]) -> bool:
    # fnmatch's '*' also crosses '/', so "DCIM/**/*" takes every file below DCIM at any depth; "**/" also
    # matches no folder at all, so "DCIM/**/*" takes DCIM's own files and "**/*" those at the volume's root.
    return any(fnmatch.fnmatchcase(relative, pattern)
               or ("**/" in pattern and fnmatch.fnmatchcase(relative, pattern.replace("**/", "")))
               for pattern in globs)
