"""GB/T 28181 device mode: registration with digest auth and keepalive against a real SIPp platform scenario,
Catalog / DeviceInfo / RecordInfo against the asyncio platform stub (tests/peers/gb_platform.py), and hostile
datagrams that must change nothing."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from edge_agent.catalog import Catalog
from edge_agent.cli.operations import render_gb28181
from edge_agent.config import ConfigError, parse_config
from edge_agent.daemon import Agent
from edge_agent.ops.health import load_schema
from edge_agent.protocol import manscdp, sip
from edge_agent.sources.cameras.gaps import GapLedger
from edge_agent.sources.gb28181 import ALARM_KIND, GbDevice
from edge_agent.sources.gb28181.device import ITEMS_PER_MESSAGE
from tests.helpers import agent_config
from tests.peers.gb_platform import DOMAIN, SERVER_ID, GbPlatform

SCENARIO = Path(__file__).parent / "peers" / "sipp" / "platform_register.xml"
DEVICE_ID = "34020000001110000001"      # the gateway (matches the SIPp scenario's verifyauth)
PASSWORD = "gb-secret-1"
GATE_CAM = "34020000001320000001"
YARD_CAM = "34020000001320000002"
ZONE_DAY = "2026-12-04"


def udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def camera(name: str, gb_id: str | None, location: str) -> dict[str, object]:
    entry: dict[str, object] = {"name": name, "rtsp": f"rtsp://127.0.0.1:1/{name}", "location": location,
                                "location_kind": "entrance"}
    if gb_id is not None:
        entry["gb_id"] = gb_id
    return entry


def gb_config(tmp_path: Path, server_port: int, *, password: str = PASSWORD, charset: str = "GB2312",
              **gb: object):
    _, config = agent_config(
        tmp_path,
        cameras=[camera("gate", GATE_CAM, "东门岗亭"), camera("yard", YARD_CAM, "后院"),
                 camera("lobby", None, "大厅")],
        gb28181={"enabled": True, "server_id": SERVER_ID, "domain": DOMAIN, "server_host": "127.0.0.1",
                 "server_port": server_port, "device_id": DEVICE_ID, "password": password, "local_host": "127.0.0.1",
                 "local_port": 0, "charset": charset, "keepalive_s": 60, **gb})
    return config


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    (tmp_path / "cat").mkdir()
    cat = Catalog(tmp_path / "cat" / "catalog.sqlite")
    yield cat
    cat.close()


def sipp(port: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    assert shutil.which("sipp"), "sipp is missing: run scripts/setup.sh (Debian package sip-tester)"
    return subprocess.Popen(
        ["sipp", "-sf", str(SCENARIO), "-i", "127.0.0.1", "-p", str(port), "-t", "u1", "-m", "2", "-nostdin",
         "-trace_err", "-error_file", str(tmp_path / "sipp_errors.log")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture
def running(tmp_path: Path, catalog: Catalog) -> Iterator[tuple[GbPlatform, GbDevice]]:
    with GbPlatform(PASSWORD) as platform:
        device = GbDevice(gb_config(tmp_path, platform.port), catalog)
        device.start()
        try:
            assert platform.registered.wait(10), "the device never registered with the stub platform"
            yield platform, device
        finally:
            device.stop()


# -- registration and keepalive with SIPp -------------------------------------------------------------------

def test_device_registers_with_digest_auth_and_keeps_alive_against_sipp(tmp_path: Path, catalog: Catalog):
    port = udp_port()
    proc = sipp(port, tmp_path)
    device = GbDevice(gb_config(tmp_path, port), catalog)
    device.start()
    try:
        # -m 2: SIPp exits 0 only when the REGISTER call (401, then a digest its verifyauth accepts, 200) and
        # a Keepalive MESSAGE call have both succeeded.
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode(errors="replace")
        assert device.wait_for(lambda h: h["registered"] and h["last_keepalive_ok_ms"] is not None, 10)
        health = device.health()["gb28181"]
        assert health["failures"] == 0 and health["last_error"] is None
        assert not [a for a in catalog.active_alarms() if a["kind"] == ALARM_KIND]
    finally:
        device.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_wrong_password_is_refused_by_sipp_and_raises_the_unregistered_alarm(tmp_path: Path, catalog: Catalog):
    port = udp_port()
    proc = sipp(port, tmp_path)
    device = GbDevice(gb_config(tmp_path, port, password="not-the-password", unregistered_alarm_s=0), catalog)
    device.start()
    try:
        assert device.wait_for(lambda h: h["failures"] >= 1, 30)
        health = device.health()["gb28181"]
        assert not health["registered"] and "403" in health["last_error"]
        alarms = [a for a in catalog.active_alarms() if a["kind"] == ALARM_KIND]
        assert len(alarms) == 1 and "check [gb28181]" in alarms[0]["message"]
    finally:
        device.stop()
        proc.kill()
        proc.wait()


def test_the_daemon_runs_the_device_and_its_health_shows_the_registration(tmp_path: Path):
    with GbPlatform(PASSWORD) as platform:
        agent = Agent(gb_config(tmp_path, platform.port))
        device = agent.add_gb28181()
        operations = agent.add_operations()
        agent.start()
        try:
            assert device.wait_for(lambda h: h["registered"] and h["last_keepalive_ok_ms"] is not None, 10)
            snapshot = operations.health.snapshot()
            jsonschema.validate(snapshot, load_schema())
            assert snapshot["gb28181"]["registered"] and snapshot["gb28181"]["device_id"] == DEVICE_ID
        finally:
            agent.stop()
        assert platform.unregistered.wait(10), "a clean stop sends an authenticated REGISTER with Expires: 0"


def test_the_device_registers_again_before_the_granted_expiry(tmp_path: Path, catalog: Catalog):
    with GbPlatform(PASSWORD, grant_expires=2) as platform:   # the server grants 2 s of the 3600 asked
        device = GbDevice(gb_config(tmp_path, platform.port), catalog)
        device.start()
        try:
            assert platform.wait_registrations(2, 20), "no refresh REGISTER within the granted 2 s"
            assert device.health()["gb28181"]["failures"] == 0
        finally:
            device.stop()


def test_unanswered_keepalives_make_the_device_register_again(tmp_path: Path, catalog: Catalog):
    with GbPlatform(PASSWORD, answer_keepalives=False) as platform:
        device = GbDevice(gb_config(tmp_path, platform.port, keepalive_s=5, keepalive_misses=1), catalog)
        device.start()
        try:
            # the first keepalive goes out on registering; still unanswered when the next is due (5 s)
            assert platform.wait_registrations(2, 30), "the device did not register again"
            health = device.health()["gb28181"]
            assert health["last_keepalive_ok_ms"] is None and health["failures"] == 1   # counted before sending
        finally:
            device.stop()


# -- queries against the stub ---------------------------------------------------------------------------------

def test_keepalive_reaches_the_stub_with_the_device_id(running: tuple[GbPlatform, GbDevice]):
    platform, device = running
    keepalive = platform.keepalives.get(timeout=10)
    assert keepalive.root == "Notify" and keepalive.device_id == DEVICE_ID and keepalive.get("Status") == "OK"
    assert device.wait_for(lambda h: h["last_keepalive_ok_ms"] is not None, 10)


def test_catalog_lists_the_cameras_with_a_gb_id_in_gb2312(running: tuple[GbPlatform, GbDevice]):
    platform, _ = running
    result = platform.query(DEVICE_ID, "Catalog")
    assert result.status == 200
    items = result.items("DeviceList")
    assert {i["DeviceID"]: i["Address"] for i in items} == {GATE_CAM: "东门岗亭", YARD_CAM: "后院"}
    assert all(doc.get("SumNum") == "2" for doc in result.responses)
    assert {i["ParentID"] for i in items} == {DEVICE_ID}


def test_device_info_names_the_gateway_and_its_channels(running: tuple[GbPlatform, GbDevice]):
    platform, _ = running
    result = platform.query(DEVICE_ID, "DeviceInfo")
    assert result.status == 200
    (info,) = result.responses
    assert info.device_id == DEVICE_ID and info.get("Result") == "OK" and info.get("Channel") == "2"


def ms(clock: str) -> int:
    return int(datetime.fromisoformat(f"{ZONE_DAY}T{clock}+08:00").timestamp() * 1000)


def add_segment(catalog: Catalog, camera: str, start: str, end: str, size: int = 1000,
                state: str = "sealed") -> None:
    name = f"{camera}/{start.replace(':', '')}.mkv"
    with catalog.transaction() as conn:
        conn.execute("INSERT INTO files (file_id, state, kind, device_id, original_path, recorded_start_ms,"
                     " recorded_end_ms, size, created_ms, updated_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (f"seg-{camera}-{start}", state, "camera", f"cam-{camera}", name, ms(start), ms(end), size,
                      0, 0))


def add_gap(catalog: Catalog, camera: str, start: str, end: str, cause: str) -> None:
    ledger = GapLedger(catalog, lambda _name: None)
    ledger.close(ledger.open(camera, ms(start), cause, f"test {cause}"), ms(end))


def test_record_info_answers_held_spans_and_the_gap_with_its_cause(running: tuple[GbPlatform, GbDevice]):
    platform, device = running
    catalog = device.catalog
    add_segment(catalog, "gate", "08:00:00", "08:01:00")
    add_segment(catalog, "gate", "08:01:00", "08:02:00")
    add_gap(catalog, "gate", "08:02:00", "08:05:00", "stream_lost")
    add_segment(catalog, "gate", "08:05:00", "08:06:00")
    add_segment(catalog, "gate", "08:06:00", "08:07:00", state="purged")   # no longer held
    add_segment(catalog, "yard", "08:00:00", "08:10:00")                   # another camera's
    result = platform.query(GATE_CAM, "RecordInfo", StartTime=f"{ZONE_DAY}T07:59:00",
                            EndTime=f"{ZONE_DAY}T08:30:00", Secrecy="0", Type="all")
    assert result.status == 200
    spans = [(i["StartTime"], i["EndTime"], i["FileSize"]) for i in result.items("RecordList")]
    assert spans == [(f"{ZONE_DAY}T08:00:00", f"{ZONE_DAY}T08:02:00", "2000"),
                     (f"{ZONE_DAY}T08:05:00", f"{ZONE_DAY}T08:06:00", "1000")]
    gaps = [g for doc in result.responses for g in doc.lists.get("GapList", [])]
    assert [(g["StartTime"], g["EndTime"], g["Cause"]) for g in gaps] == [
        (f"{ZONE_DAY}T08:02:00", f"{ZONE_DAY}T08:05:00", "stream_lost")]
    assert result.responses[0].device_id == GATE_CAM and result.responses[0].get("Name") == "gate"
    alarm_only = platform.query(GATE_CAM, "RecordInfo", StartTime=f"{ZONE_DAY}T07:59:00",
                                EndTime=f"{ZONE_DAY}T08:30:00", Type="alarm")
    assert alarm_only.status == 200 and alarm_only.responses[0].get("SumNum") == "0"


def test_a_long_record_list_is_split_across_messages_each_with_the_total(running: tuple[GbPlatform, GbDevice]):
    platform, device = running
    spans = 2 * ITEMS_PER_MESSAGE + 1
    for minute in range(spans):   # one-minute recordings with a minute's gap between each
        add_segment(device.catalog, "yard", f"09:{2 * minute:02d}:00", f"09:{2 * minute:02d}:30")
    result = platform.query(YARD_CAM, "RecordInfo", StartTime=f"{ZONE_DAY}T09:00:00",
                            EndTime=f"{ZONE_DAY}T10:00:00")
    assert len(result.responses) == 3
    assert {doc.get("SumNum") for doc in result.responses} == {str(spans)}
    assert [int(doc.lists["RecordList"] and len(doc.lists["RecordList"])) for doc in result.responses] == [4, 4, 1]
    assert len({i["StartTime"] for i in result.items("RecordList")}) == spans


def test_a_retransmitted_query_is_answered_again_but_not_redone(running: tuple[GbPlatform, GbDevice]):
    platform, device = running
    query = platform.query_message(DEVICE_ID, "DeviceInfo", 42, {}).render()
    platform.send_raw(query)
    platform.send_raw(query)   # the platform did not see our 200 and sends the same transaction again
    assert [platform.replies.get(timeout=10).status for _ in range(2)] == [200, 200]
    assert platform.messages.get(timeout=10).sn == 42
    assert device.health()["gb28181"]["answered"] == {"DeviceInfo": 1}


# -- hostile input --------------------------------------------------------------------------------------------

def test_hostile_datagrams_are_dropped_and_the_device_keeps_answering(running: tuple[GbPlatform, GbDevice]):
    platform, device = running
    platform.send_raw(os.urandom(512))                                       # garbage
    start = b"MESSAGE sip:x@y SIP/2.0\r\n"
    platform.send_raw(start + b"A" * (65507 - len(start)))                   # the largest UDP datagram
    platform.send_raw(b"REGISTER sip:x SIP/2.0\r\nVia: x\r\n\r\n")             # no From/To/Call-ID/CSeq
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as forger:   # a query from another address
        forger.bind(("127.0.0.1", 0))
        forged = platform.query_message(DEVICE_ID, "Catalog", 7, {})
        forger.sendto(forged.render(), ("127.0.0.1", device.local_port))
    assert device.wait_for(lambda h: h["dropped"].get("unexpected_source") == 1
                           and h["dropped"].get("oversized") == 1 and h["dropped"].get("malformed") == 2, 10)
    # a query for a camera the gateway does not have, and bodies that do not parse
    assert platform.query("34020000001320009999", "RecordInfo", StartTime=f"{ZONE_DAY}T00:00:00",
                          EndTime=f"{ZONE_DAY}T01:00:00").status == 404
    assert platform.query(GATE_CAM, "RecordInfo", StartTime="yesterday", EndTime="today").status == 400
    assert platform.query(DEVICE_ID, "Broadcast").status == 501
    bad = platform.query_message(DEVICE_ID, "Catalog", 9, {})
    bad.body = b'<?xml version="1.0"?><!DOCTYPE q [<!ENTITY a "aaaa">]><Query>&a;</Query>'
    platform.send_raw(bad.render())
    assert platform.replies.get(timeout=10).status == 400
    assert platform.query(DEVICE_ID, "DeviceInfo").status == 200   # still answering
    assert device.health()["gb28181"]["answered"] == {"DeviceInfo": 1}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.builds(lambda tail: b"MESSAGE sip:a@b SIP/2.0\r\n" + tail, st.binary()))
def test_the_codecs_refuse_any_bytes_with_their_own_error_only(data: bytes):
    for parse, error in ((sip.parse, sip.SipError), (manscdp.parse_body, manscdp.ManscdpError)):
        try:
            parse(data)
        except error:
            pass


# -- the codec and the config ---------------------------------------------------------------------------------

def test_digest_matches_rfc_2617s_worked_example():
    challenge = sip.parse_challenge('Digest realm="testrealm@host.com", qop="auth,auth-int", '
                                    'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
                                    'opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    value = sip.digest_response(challenge, username="Mufasa", password="Circle Of Life", method="GET",
                                uri="/dir/index.html", cnonce="0a4f113b")
    assert 'response="6629fae49393a05397450978507c4ef1"' in value
    assert sip.check_authorization(value, password="Circle Of Life", method="GET")
    assert not sip.check_authorization(value, password="circle of life", method="GET")


def test_manscdp_reads_gb2312_and_utf8_alike():
    doc = manscdp.Manscdp("Response", "Catalog", 3, DEVICE_ID, {"SumNum": "1"},
                          {"DeviceList": [{"DeviceID": GATE_CAM, "Name": "东门"}]})
    for charset in ("GB2312", "UTF-8"):
        back = manscdp.parse_body(manscdp.render_body(doc, charset))
        assert back.lists["DeviceList"] == [{"DeviceID": GATE_CAM, "Name": "东门"}] and back.sn == 3


def test_gb_ids_and_the_password_file_are_validated(tmp_path: Path):
    base = {"agent": {"id": "gw-1", "site": "s", "unit": "u"}}
    with pytest.raises(ConfigError, match="exactly 20 digits"):
        parse_config({**base, "cameras": [{**camera("gate", "3402000000132000000", "x")}]})
    with pytest.raises(ConfigError, match="exactly 20 digits"):
        parse_config({**base, "gb28181": {"device_id": "3402000000111000000A"}})
    with pytest.raises(ConfigError, match="used twice"):
        parse_config({**base, "cameras": [camera("a", GATE_CAM, "x"), camera("b", GATE_CAM, "y")]})
    with pytest.raises(ConfigError, match="needs server_id, domain"):
        parse_config({**base, "gb28181": {"enabled": True, "device_id": DEVICE_ID, "password": "p"}})
    secret = tmp_path / "gb.pass"
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    config = parse_config({**base, "gb28181": {"enabled": True, "server_id": SERVER_ID, "domain": DOMAIN,
                                               "device_id": DEVICE_ID, "password_file": str(secret)}})
    with pytest.raises(PermissionError, match="chmod 600"):
        config.gb28181.read_password()
    secret.chmod(0o600)
    assert config.gb28181.read_password() == "from-file"
    secret.unlink()
    with pytest.raises(ConfigError, match="gb28181.password_file"):
        config.gb28181.read_password()


def test_a_local_port_in_use_stops_the_device_at_build_naming_the_key(tmp_path: Path, catalog: Catalog):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        config = gb_config(tmp_path, 5060, local_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="gb28181.local_port .*choose a free port"):
            GbDevice(config, catalog)


def test_status_shows_the_registration_and_the_last_error():
    def shown(fragment: dict[str, object]) -> str:
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(render_gb28181(fragment))
        return console.export_text()

    down = shown({"server": "10.0.0.2:5060", "registered": False, "last_keepalive_ok_ms": None,
                  "last_error": "REGISTER answered 403 Forbidden [sic]"})
    assert "not registered" in down and "403 Forbidden [sic]" in down
    up = shown({"server": "10.0.0.2:5060", "registered": True, "last_keepalive_ok_ms": 1796387653391,
                "last_error": None})
    assert "registered" in up and "not registered" not in up and "last keepalive answered" in up
