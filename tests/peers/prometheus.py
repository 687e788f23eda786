"""A real Prometheus (Debian package `prometheus`) on a free loopback port, scraping given targets with given rule
files, queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.peers.mosquitto import free_port


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        raise RuntimeError("promtool is not installed: run scripts/setup.sh (Debian package prometheus)")
    return subprocess.run([binary, *args], input=stdin.decode() if stdin is not None else None,
                          capture_output=True, text=True, timeout=60)


class Prometheus:
    """`prometheus` with a generated config: scrape every second, evaluate rules every second."""

    def __init__(self, workdir: Path, targets: list[str], rule_files: list[Path]):
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("prometheus is not installed: run scripts/setup.sh (Debian package prometheus)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "edge-fleet", "static_configs": [{"targets": targets}]}],
        }))
        self.log = self.workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.path={self.workdir / 'data'}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after 30 s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def firing(self, alertname: str) -> list[dict[str, str]]:
        """The labels of each firing alert of that name."""
        return [a["labels"] for a in self.api("alerts")["alerts"]
                if a["labels"].get("alertname") == alertname and a["state"] == "firing"]
