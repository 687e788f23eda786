"""A real mosquitto on a free loopback port, which a test may stop and start again (outages)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class Mosquitto:
    """mosquitto with a generated config. `extra` adds config lines (TLS listeners, ACLs)."""

    def __init__(self, workdir: Path, port: int | None = None, extra: str = "", listener: str | None = None,
                 host: str = "127.0.0.1"):
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = host   # where it listens: loopback, or the host side of the test hosts' links (tests/netns.py)
        self.config = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        listener = listener or f"listener {self.port} {host}\nallow_anonymous true\n"
        self.config.write_text(
            "per_listener_settings false\n" + listener + "persistence false\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            "max_inflight_messages 0\nmax_queued_messages 0\nmessage_size_limit 0\n" + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        try:
            wait_port(self.port, host=self.host)
        except TimeoutError as exc:
            self.stop()
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"mosquitto did not start: {log}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def tls_listener(port: int, ca: Path, cert: Path, key: Path, acl_file: Path | None = None) -> str:
    """A mutual-TLS listener: clients need a certificate from `ca`; its CN is their username (for the ACL)."""
    # Run as root, mosquitto drops to user "mosquitto", which cannot read keys in a test's 0700 tmp dir.
    lines = ["user root", f"listener {port} 127.0.0.1", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
             "require_certificate true", "use_identity_as_username true", "allow_anonymous false"]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    return "\n".join(lines) + "\n"


def evidence_acl(path: Path, root: str = "evidence/v2", *, receivers: tuple[str, ...] = (),
                 platforms: tuple[str, ...] = ()) -> Path:
    """The wire protocol's ACL (DESIGN.md section 5): an agent (username = its id) publishes only its own
    status, health, events and files, and reads only its own acks and commands; receivers read every
    agent's uplink and write acks; the platform writes commands and reads status, health and events."""
    lines: list[str] = []
    for user in receivers:
        lines += [f"user {user}", f"topic read {root}/+/files/#", f"topic write {root}/+/acks",
                  f"topic read {root}/+/chain/#", f"topic write {root}/+/chain_acks",
                  f"topic write {root}/_platform/events",
                  f"topic read {root}/+/status", f"topic read {root}/+/health", f"topic read {root}/+/events", ""]
    for user in platforms:
        lines += [f"user {user}", f"topic write {root}/+/commands", f"topic read {root}/+/status",
                  f"topic read {root}/_platform/events",
                  f"topic read {root}/+/health", f"topic read {root}/+/events", ""]
    # Patterns apply to every user; %u is the certificate's CN, i.e. the agent id.
    lines += [f"pattern write {root}/%u/status", f"pattern write {root}/%u/health",
              f"pattern write {root}/%u/events", f"pattern write {root}/%u/files/#",
              f"pattern write {root}/%u/chain/#", f"pattern read {root}/%u/chain_acks",
              f"pattern read {root}/%u/acks", f"pattern read {root}/%u/commands", ""]
    path.write_text("\n".join(lines))
    return path
