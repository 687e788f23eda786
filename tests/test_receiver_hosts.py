"""Receivers on separate test hosts (network namespaces, tests/netns.py): each receiver process runs in its own
namespace and reaches mosquitto and SeaweedFS only over its veth link to the host. They share nothing but the
broker and the two buckets (Object Lock for committed files, transfers in progress in the other)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from edge_agent.evidence.manifest import canonical_json
from edge_agent.evidence.receipts import Expected, PinnedKeys, check_receipt
from edge_agent.protocol.wire import chunk_count
from tests.helpers import wait_for
from tests.netns import TestHosts, hosts_or_skip
from tests.peers.mosquitto import Mosquitto
from tests.seaweedfs import SeaweedFS
from tests.sync_support import (
    AGENT_ID,
    ScriptedAgent,
    enrolled_agent_key,
    held_seqs,
    pinned_dir,
    receiver_logged,
    receiver_proc,
    receiver_setup,
    stop_all,
)

CHUNK = 64 * 1024
LOCKED, TRANSFERS = "evidence-locked", "evidence-transfers"


@pytest.fixture
def hosts():
    made = hosts_or_skip(2)
    try:
        yield made
    finally:
        made.close()


def assert_stored_once(s3, pinned: PinnedKeys, ack: dict, doc: dict, content: bytes) -> None:
    """`complete` with a valid receipt; the bytes identical, under Object Lock; one version of every key."""
    fid, sha = doc["file_id"], doc["sha256"]
    assert (ack["state"], ack["sha256"]) == ("complete", sha)
    check_receipt(ack["receipt"], pinned, Expected(AGENT_ID, fid, sha, len(content),
                                                   hashlib.sha256(canonical_json(doc)).hexdigest()))
    assert s3.get_object(Bucket=LOCKED, Key=f"objects/{sha}")["Body"].read() == content
    assert s3.get_object_retention(Bucket=LOCKED, Key=f"objects/{sha}")["Retention"]["Mode"] == "COMPLIANCE"
    for k in (f"objects/{sha}", f"index/{AGENT_ID}/{fid}.json"):
        listed = s3.list_object_versions(Bucket=LOCKED, Prefix=k).get("Versions", [])
        assert [v["Key"] for v in listed] == [k], f"{k} written more than once"


@pytest.mark.extended   # SeaweedFS and two receivers in namespaces: 13 s (quiet) to 25 s (loaded) on 2 cores
def test_two_receivers_on_separate_hosts_share_the_load_and_one_killed_mid_transfer_loses_nothing(
        hosts: TestHosts, tmp_path: Path) -> None:
    """Two `receiver run` processes, each in its own network namespace, behind one shared subscription. The
    agent (on the host) sends four files; each file's chunks are split between the receivers. Receiver 1 is
    killed -9 with half of every file acknowledged; the agent sends again what the acks do not name (as a real
    one does) until every file is `complete`: stored once, byte-identical, under Object Lock, with a valid
    receipt, and nothing left of the transfers."""
    # `user root`: mosquitto keeps the rights to write its log in the test's directory (read below)
    broker = Mosquitto(tmp_path / "broker", host=hosts.host_ip, extra="user root\n").start()
    seaweed = SeaweedFS(tmp_path / "seaweedfs", s3_host=hosts.host_ip)
    seaweed.start()
    s3 = seaweed.client()
    s3.create_bucket(Bucket=LOCKED, ObjectLockEnabledForBucket=True)
    s3.create_bucket(Bucket=TRANSFERS)
    key = enrolled_agent_key(tmp_path)
    store = seaweed.store_toml(tmp_path, LOCKED, TRANSFERS)
    procs, agent = [], None
    try:
        for i, name in enumerate(("receiver-1", "receiver-2")):
            config = receiver_setup(tmp_path, broker.port, tmp_path / name, tmp_path / "enrolled", name=name,
                                    mqtt_host=hosts.host_ip, shared_subscription=True)
            config.write_text(config.read_text(encoding="utf-8") + store, encoding="utf-8")
            procs.append(receiver_proc(tmp_path, config, name, hosts[i].command([])).start())
        for name in ("receiver-1", "receiver-2"):
            wait_for(lambda name=name: receiver_logged(tmp_path, "mqtt connected", name), 30, what=f"{name} up")
        # Each receiver reached the broker from its own host, over its link.
        connected = dict(re.findall(r"New client connected from ([\d.]+):\d+ as (receiver-\d)",
                                    broker.log.read_text()))
        assert {v: k for k, v in connected.items()} == {"receiver-1": hosts[0].ip, "receiver-2": hosts[1].ip}

        agent = ScriptedAgent(broker.port, key, host=hosts.host_ip)
        files = []
        for n in range(4):
            content = os.urandom(20 * CHUNK + 100 * n + 1)
            doc = agent.manifest(content, CHUNK)
            files.append((doc, content, chunk_count(len(content), CHUNK)))
            agent.send_manifest(doc)
        for doc, content, total in files:   # the first half of every file, until all of it is acknowledged
            agent.send_chunks(doc, content, list(range(total // 2)))
        for doc, content, total in files:
            for _ in range(20):   # a chunk that beat its manifest into the bucket at the other receiver: again
                missing = set(range(total // 2)) - held_seqs(agent.current_ack(doc["file_id"]))
                if not missing:
                    break
                agent.send_chunks(doc, content, sorted(missing))
            assert not missing
        procs[0].kill9()

        for doc, content, total in files:
            agent.send_chunks(doc, content, list(range(total // 2, total)))
        acks = {doc["file_id"]: agent.resend_until_complete(doc, content, acked=total // 2)
                for doc, content, total in files}
        for doc, content, _total in files:
            assert_stored_once(s3, PinnedKeys(pinned_dir(tmp_path)), acks[doc["file_id"]], doc, content)
        assert s3.list_objects_v2(Bucket=TRANSFERS, Prefix="transfers/").get("KeyCount", 0) == 0
        assert procs[1].alive
    finally:
        stop_all(agent, procs)
        seaweed.stop()
        broker.stop()
