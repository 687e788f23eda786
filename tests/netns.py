"""Separate test hosts on this machine: network namespaces joined to the host by veth pairs.

`TestHosts(n)` makes `n` namespaces, each with one veth link whose host end is enslaved to a bridge of its own;
the bridge holds the host's address on a private /24 (10.200.S.1, S chosen free), the namespaces hold
10.200.S.11, .12, ... . A service the test starts on the host listening on `hosts.host_ip` (mosquitto, SeaweedFS)
is reachable from the namespaces only over those links (a namespace has no other interface but its own
loopback), and a process started with `hosts[i].command(...)` (`ip netns exec NS ...`) runs on host i.

Used as a context manager: whatever happens inside, the exit kills what still runs in the namespaces, deletes
them (which deletes their veth ends, and so the pairs) and the bridge. `NetnsUnavailable` (with the command's
error) when namespaces cannot be made here (not root, no `ip`, a kernel without veth); the pytest fixture
`test_hosts` turns that into a skip with the reason. Traffic stays on this machine: nothing routes the /24
anywhere else.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "10.200"


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made on this machine; the text says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclass(frozen=True)
class TestHost:
    __test__ = False   # not a pytest class

    name: str   # the namespace
    ip: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec` execs it: the child's pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]


def _used_subnets() -> set[int]:
    """Third octets of 10.200.x.0/24 already on an address or route here (another run's, or the machine's)."""
    used = set()
    text = _ip("-4", "addr", "show", check=False).stdout + _ip("-4", "route", "show", "table", "all",
                                                                 check=False).stdout
    for word in text.replace("/", " ").split():
        if word.startswith(PREFIX + "."):
            try:
                used.add(int(ipaddress.ip_address(word).packed[2]))
            except ValueError:
                continue
    return used


class TestHosts:
    """`count` test hosts in network namespaces behind one bridge (see the module's docstring)."""

    __test__ = False

    def __init__(self, count: int):
        self.count = count
        self.tag = f"{os.getpid() % 0xffff:04x}{random.randrange(0x100):02x}"   # interface names <= 15 chars
        self.bridge = f"esb{self.tag}"
        self.hosts: list[TestHost] = []
        self.host_ip = ""
        self._made: list[str] = []   # namespaces created, for the teardown

    def __enter__(self) -> TestHosts:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (ip netns add); run the test as root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> TestHost:
        return self.hosts[i]

    def _create(self) -> None:
        free = sorted(set(range(16, 250)) - _used_subnets())
        if not free:
            raise NetnsUnavailable(f"no free {PREFIX}.x.0/24 subnet for the test hosts")
        subnet = f"{PREFIX}.{random.choice(free)}"
        self.host_ip = f"{subnet}.1"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.count):
            name, host_end, ns_end = f"esn{self.tag}{i}", f"esh{self.tag}{i}", f"esv{self.tag}{i}"
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", name)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            address = f"{subnet}.{11 + i}"
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", ns_end)
            _ip("-n", name, "link", "set", ns_end, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            self.hosts.append(TestHost(name, address))

    def close(self) -> None:
        """Kill what still runs in the namespaces (a namespace outlives its name while a process holds it),
        then delete them and the bridge. Never raises: a teardown must not hide the test's own failure."""
        for name in self._made:
            pids = _ip("netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    continue
            _ip("netns", "del", name, check=False)
        self._made.clear()
        _ip("link", "del", self.bridge, check=False)


def hosts_or_skip(count: int) -> TestHosts:
    """`TestHosts(count)` entered (the caller closes it), or the test skipped with the reason they cannot be made."""
    import pytest

    try:
        return TestHosts(count).__enter__()
    except NetnsUnavailable as exc:
        pytest.skip(f"separate test hosts (network namespaces) cannot be made here: {exc}")
