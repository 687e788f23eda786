#!/usr/bin/env python3
"""The fleet monitor's cost, against `mosquitto_sub` consuming the same retained set, in one run.

One real mosquitto; simulated agents publish what a real agent publishes (status and a health snapshot a real
agent's HealthMonitor built, tests/fleet_support.py). The monitor is `edge-agent fleet serve` as a process.

  retained  `--retained` agents' retained status + health are on the broker before the monitor starts (a
            monitor restarting under a full fleet). Measured: messages/s from the monitor's subscription (its
            log) to its last message (now minus edge_fleet_last_message_age_seconds), against `mosquitto_sub
            -C <all>` reading the same retained set (the ratio is the figure), the monitor's RSS and CPU per
            1,000 messages, and the latency of one /metrics scrape at that size.
  live      `--agents` agents each publishing health every `--interval-s` seconds (default 30 s compressed
            `--compress` times) for `--rounds` rounds to a fresh monitor: CPU per 1,000 messages, RSS, and the
            median of `--scrapes` scrape latencies.

    .venv/bin/python scripts/bench_fleet.py [--agents 500] [--retained 10000] [--rounds 10] [--compress 30]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fleet_support import Publisher, fleet_config, fleet_proc, health_of, real_snapshot, scrape, value  # noqa: E402
from tests.peers.mosquitto import Mosquitto  # noqa: E402

MIB = 1024 * 1024


def publish_fleet(pub: Publisher, template: dict, agents: int, prefix: str) -> int:
    now = int(time.time() * 1000)
    for i in range(agents):
        agent = f"{prefix}-{i:05d}"
        pub.online(agent, now)
        pub.send(agent, "health", health_of(template, agent, ts_ms=now))
    return 2 * agents


def subscribed_at(log: Path) -> float:
    """When the monitor subscribed (its log's asctime), as a Unix time."""
    for line in log.read_text().splitlines():
        if "event=fleet_subscribed" in line:
            stamp = re.match(r"(\S+ \S+),(\d+)", line)
            assert stamp is not None
            return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(stamp[2]) / 1000
    raise RuntimeError(f"the monitor did not subscribe: {log.read_text()[-2000:]}")


def timed_scrape(listen: str) -> tuple[float, str]:
    start = time.perf_counter()
    text = scrape(listen)
    return time.perf_counter() - start, text


def wait_messages(listen: str, expected: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Only the monitor's own counters: a full scrape would compete with the ingest being measured.
        text = scrape(listen, "edge_fleet_messages_total", "edge_fleet_last_message_age_seconds")
        seen = sum(value(text, "edge_fleet_messages_total", topic=t) or 0 for t in ("status", "health"))
        if seen >= expected:
            return text
        time.sleep(0.2)
    raise TimeoutError(f"the monitor saw fewer than {expected} messages in {timeout} s")


def bench_retained(tmp: Path, template: dict, agents: int) -> dict:
    tmp.mkdir(parents=True)
    broker = Mosquitto(tmp / "broker").start()
    pub = Publisher(broker.port)
    try:
        messages = publish_fleet(pub, template, agents, "ret")
        # The baseline: mosquitto_sub reading the same retained set, to /dev/null.
        start = time.perf_counter()
        subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-q", "1", "-C", str(messages),
                        "-t", "evidence/v1/+/status", "-t", "evidence/v1/+/health"],
                       stdout=subprocess.DEVNULL, check=True, timeout=300)
        sub_s = time.perf_counter() - start
        config, listen = fleet_config(tmp, broker.port)
        monitor = fleet_proc(tmp, config).start()
        try:
            proc = psutil.Process(monitor.popen.pid)
            text = wait_messages(listen, messages, 600)
            done = time.time() - (value(text, "edge_fleet_last_message_age_seconds") or 0)
            monitor_s = done - subscribed_at(tmp / "fleet.log")
            cpu = proc.cpu_times()
            rss = proc.memory_info().rss
            latency, text = timed_scrape(listen)
            return {"agents": agents, "messages": messages, "mosquitto_sub_s": round(sub_s, 3),
                    "mosquitto_sub_msg_s": round(messages / sub_s), "monitor_s": round(monitor_s, 3),
                    "monitor_msg_s": round(messages / monitor_s), "ratio": round(sub_s / monitor_s, 3),
                    "rss_mib": round(rss / MIB, 1), "rss_mib_after_scrape": round(proc.memory_info().rss / MIB, 1),
                    "cpu_s_total": round(cpu.user + cpu.system, 2),
                    "scrape_s": round(latency, 3), "exposition_kib": round(len(text) / 1024)}
        finally:
            monitor.stop()
    finally:
        pub.close()
        broker.stop()


def bench_live(tmp: Path, template: dict, agents: int, rounds: int, interval_s: float, scrapes: int) -> dict:
    tmp.mkdir(parents=True)
    broker = Mosquitto(tmp / "broker").start()
    pub = Publisher(broker.port)
    config, listen = fleet_config(tmp, broker.port)
    monitor = fleet_proc(tmp, config).start()
    try:
        proc = psutil.Process(monitor.popen.pid)
        publish_fleet(pub, template, agents, "live")
        wait_messages(listen, 2 * agents, 120)
        before = proc.cpu_times()
        latencies = []
        for round_no in range(rounds):
            started = time.monotonic()
            now = int(time.time() * 1000)
            for i in range(agents):
                agent = f"live-{i:05d}"
                pub.send(agent, "health", health_of(template, agent, ts_ms=now + round_no))
            if len(latencies) < scrapes:
                latencies.append(timed_scrape(listen)[0])
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
        wait_messages(listen, 2 * agents + rounds * agents, 120)
        after = proc.cpu_times()
        cpu_s = (after.user + after.system) - (before.user + before.system)   # includes the scrapes
        return {"agents": agents, "rounds": rounds, "interval_s": interval_s, "messages": rounds * agents,
                "cpu_s_per_1000_msgs": round(cpu_s / (rounds * agents / 1000), 4),
                "rss_mib": round(proc.memory_info().rss / MIB, 1),
                "scrape_s_median": round(statistics.median(latencies), 3),
                "scrape_s_max": round(max(latencies), 3)}
    finally:
        monitor.stop()
        pub.close()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--retained", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compress", type=float, default=30, help="30 s health intervals run this much faster")
    parser.add_argument("--scrapes", type=int, default=10)
    parser.add_argument("--cameras", type=int, default=4, help="cameras in each agent's snapshot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "template").mkdir()
        template = real_snapshot(tmp / "template", cameras=args.cameras)
        print(f"health snapshot: {len(json.dumps(template))} bytes", file=sys.stderr)
        live = bench_live(tmp / "live", template, args.agents, args.rounds, 30 / args.compress, args.scrapes)
        print(json.dumps({"live": live}), flush=True)
        retained = bench_retained(tmp / "retained", template, args.retained)
        print(json.dumps({"retained": retained}), flush=True)


if __name__ == "__main__":
    main()
