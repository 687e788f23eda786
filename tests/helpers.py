"""Small builders shared by the tests: configs, recorder volumes, waiting on conditions."""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig, parse_config


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A tiny TOML writer for test configs (tables, arrays of tables, scalars)."""

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    if "agent" in data and isinstance(data.get("health", {}), dict):
        # These machines' clocks are not NTP-synchronised: the agent's true alarm about it (clock_unsynchronized)
        # would stand in every test's alarms; tests/test_clock_sync.py turns it on.
        data = {**data, "health": {"clock_sync_alarm": False, **data.get("health", {})}}
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {scalar(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {scalar(v)}" for k, v in item.items()]
        else:
            lines.insert(0, f"{key} = {scalar(value)}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    tomllib.loads(path.read_text(encoding="utf-8"))  # the writer's own check
    return path


def agent_config(tmp_path: Path, *, agent: dict[str, Any] | None = None, **sections: Any) -> tuple[Path, AgentConfig]:
    """Write agent.toml under tmp_path with a data dir of its own; returns (path, parsed config)."""
    data: dict[str, Any] = {
        "agent": {"id": "ws-test-01", "site": "nj-gulou", "unit": "鼓楼区城管大队",
                  "data_dir": str(tmp_path / "data"), "max_disk_gb": 50, "min_free_mb": 0, **(agent or {})},
        **sections,
    }
    path = write_toml(tmp_path / "agent.toml", data)
    return path, parse_config(tomllib.loads(path.read_text(encoding="utf-8")), path)


def make_recorder_volume(root: Path, label: str, files: dict[str, bytes | int], *,
                         identity: dict[str, str] | None = None, age_s: float = 60) -> Path:
    """A recorder volume as a directory tree. An int value makes a file of that many random bytes."""
    volume = root / label
    volume.mkdir(parents=True, exist_ok=True)
    if identity is not None:
        (volume / "DEVICE.INI").write_text("".join(f"{k}={v}\n" for k, v in identity.items()))
    past = time.time() - age_s
    for relative, content in files.items():
        path = volume / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, int):
            with open(path, "wb") as out:
                left = content
                while left:
                    block = os.urandom(min(left, 1 << 20))
                    out.write(block)
                    left -= len(block)
        else:
            path.write_bytes(content)
        os.utime(path, (past, past))
    return volume


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small filesystem (tmpfs of `size`, e.g. "8m") mounted at `path` (mode 0750), so a disk really fills."""
    path.mkdir(mode=0o750, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextmanager
def unreadable(target: Path) -> Iterator[Path]:
    """`target` (a file) made unreadable even for root while the context lasts.

    Tests run as root, so chmod 000 reads fine. /proc/sys/vm/drop_caches is a write-only kernel file
    (open for reading fails with EACCES, also for root); bind-mounted over a file on the volume it is
    an unreadable regular file, as a bad sector or a locked file would be.
    """
    subprocess.run(["mount", "--bind", "/proc/sys/vm/drop_caches", str(target)], check=True)
    try:
        try:
            open(target, "rb").close()
        except PermissionError:
            yield target
        else:
            raise AssertionError(f"{target} is still readable after the bind mount")
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def resident_pages(path: Path) -> int:
    """How many pages of the file at `path` are in the page cache: mincore(2) over a read-only mapping of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * pages)()
            assert libc.mincore(address, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(byte & 1 for byte in vec)
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
