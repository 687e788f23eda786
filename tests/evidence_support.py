"""Builders for the evidence-core tests: running agents, large recorder files, reading the store."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drivers.base import DockDriver
from edge_agent.catalog import Catalog, FileRecord
from edge_agent.config import AgentConfig
from edge_agent.daemon import Agent, build_agent
from tests.helpers import agent_config, wait_for

# Recorder file names as each model in edge_agent/data/recorders.toml writes them.
ZFY_VENDOR, ZFY_PRODUCT = 0x2717, 0x0101
HK_VENDOR, HK_PRODUCT = 0x2BDF, 0x0102


@contextmanager
def running_agent(config: AgentConfig, dock_drivers: list[DockDriver] | None = None) -> Iterator[Agent]:
    agent = build_agent(config, dock_drivers=dock_drivers)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def large_file(path: Path, size: int, age_s: float = 60) -> Path:
    """A big recorder file, cheap to make: 1 MiB of random bytes, then a sparse tail (reads as zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(os.urandom(1 << 20))
        out.truncate(size)
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def records(catalog: Catalog, **where: str) -> list[FileRecord]:
    clause = " AND ".join(f"{k} = ?" for k in where)
    return catalog.files(where=clause, params=tuple(where.values()))


def wait_states(catalog: Catalog, count: int, state: str = "sealed", timeout: float = 60) -> list[FileRecord]:
    return wait_for(lambda: (lambda rs: rs if len(rs) == count else None)(catalog.files(states=[state])),
                    timeout=timeout, what=f"{count} files {state}")


def growing_partial(staging: Path, timeout: float = 60) -> Path:
    """The staging/*.part of a copy in progress, once it has been seen to grow."""
    sizes: dict[Path, int] = {}

    def grown() -> Path | None:
        for part in staging.glob("*.part"):
            try:
                size = part.stat().st_size
            except FileNotFoundError:
                continue
            if size > sizes.get(part, size):
                return part
            sizes[part] = size
        return None

    return wait_for(grown, timeout=timeout, interval=0.005, what="a staging/*.part that grows")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def offline_agent_config(tmp_path: Path, **sections: Any) -> tuple[Path, AgentConfig]:
    """`agent_config` with the platform unreachable (nothing listens on its MQTT port): sealed files stay
    `sealed`, so ingest tests see ingest alone, whatever broker this machine runs on 1883."""
    return agent_config(tmp_path, mqtt={"host": "127.0.0.1", "port": closed_port()}, **sections)
