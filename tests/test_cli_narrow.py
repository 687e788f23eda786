"""The CLI readable at 80 columns (issue 15): no line wider than the terminal, no id or state cut short;
short file ids (a unique prefix) accepted wherever an id is taken; `files list` pages and says where it
stopped; an empty alarm list says so; the human output in Chinese under a Chinese locale, `--json` English.

Each command runs as the custodian runs it: a process with COLUMNS=80 (rich sizes its console from it).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from edge_agent.catalog import Catalog
from tests.helpers import agent_config, make_recorder_volume

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 80
STATES = {"discovered", "staged", "sealed", "sending", "synced", "source_cleared", "purged", "rejected"}
LONG = "DCIM/100MEDIA/20261125_143015_ZFY0777_320102456_路口执勤_第二段录像_完整版.MP4"
CARD = {LONG: 4_000, "DCIM/100MEDIA/FILE0002.MP4": 2_000, "DCIM/100MEDIA/FILE0003.MP4": 1_000,
        "AUDIO/REC_0004.WAV": 500}


def edge_agent(config: Path, *args: str, lang: str = "C.UTF-8", check: bool = True) -> str:
    env = {**os.environ, "COLUMNS": str(WIDTH), "LANG": lang, "LC_ALL": "", "LANGUAGE": "", "TERM": "xterm"}
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "--config", str(config), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def assert_fits(output: str) -> None:
    wide = [line for line in output.splitlines() if cell_len(line) > WIDTH]
    assert not wide, "wider than 80 columns:\n" + "\n".join(wide)
    assert "…" not in output, "a cell was cut short:\n" + output


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("narrow")
    config_path, _ = agent_config(tmp)
    card = make_recorder_volume(tmp, "SDCARD", CARD)
    edge_agent(config_path, "--json", "import", str(card), "--device", "ZFY0777", "--officer", "320102456",
               "--reason", "card handed in")
    listed = json.loads(edge_agent(config_path, "--json", "files", "list", "--all"))
    return config_path, listed["files"]


def test_list_views_fit_80_columns_with_whole_short_ids_and_states(imported: tuple[Path, list[dict]]) -> None:
    config, files = imported
    out = edge_agent(config, "files", "list")
    assert_fits(out)
    rows = [line for line in out.splitlines() if any(f["file_id"][:10] in line for f in files)]
    assert len(rows) == len(CARD)
    for f in files:
        assert f["file_id"][:10] in out and f["state"] in out
    assert all(any(state in row.split() or f" {state} " in row for state in STATES) for row in rows)
    for args in (["devices", "list"], ["status"], ["alarms", "list"], ["verify", "--all"]):
        assert_fits(edge_agent(config, *args))


def test_a_short_id_is_accepted_wherever_a_file_id_is_taken(imported: tuple[Path, list[dict]]) -> None:
    config, files = imported
    target = files[0]
    short = target["file_id"][:10]
    others = [f for f in files if f["file_id"].startswith(short) and f is not target]
    short = target["file_id"][:10 + next((n for n in range(16) if not any(
        o["file_id"].startswith(target["file_id"][:10 + n]) for o in others)), 16)]
    shown = edge_agent(config, "files", "show", short)
    assert_fits(shown)
    assert target["file_id"] in shown.replace("\n", "").replace("│", "").replace(" ", "")
    detail = json.loads(edge_agent(config, "--json", "files", "show", short.lower()))
    assert detail["file"]["file_id"] == target["file_id"]
    report = json.loads(edge_agent(config, "--json", "verify", short))
    assert report["checked_files"] == 1 and report["ok"]


def test_files_list_pages_says_where_it_stopped_and_gives_json_a_total_and_a_cursor(
        imported: tuple[Path, list[dict]]) -> None:
    config, files = imported
    out = edge_agent(config, "files", "list", "--limit", "2")
    assert_fits(out)
    assert "Stopped at the limit of 2: 2 more" in out.replace("\n", " ")
    first = json.loads(edge_agent(config, "--json", "files", "list", "--limit", "3"))
    assert (first["total"], first["count"], first["limit"]) == (4, 3, 3) and first["next_cursor"]
    rest = json.loads(edge_agent(config, "--json", "files", "list", "--limit", "3", "--cursor", first["next_cursor"]))
    assert (rest["count"], rest["next_cursor"]) == (1, None)
    assert [f["file_id"] for f in first["files"] + rest["files"]] == [f["file_id"] for f in files]
    assert json.loads(edge_agent(config, "--json", "files", "list", "--since", "1h"))["total"] == 4
    assert json.loads(edge_agent(config, "--json", "files", "list", "--since", "2999-01-01"))["total"] == 0
    assert json.loads(edge_agent(config, "--json", "files", "list", "--state", "synced"))["total"] == 0


def test_alarms_list_says_there_are_none_and_shows_one_whole(imported: tuple[Path, list[dict]]) -> None:
    config, _ = imported
    assert edge_agent(config, "alarms", "list").strip() == "no active alarms"
    assert edge_agent(config, "alarms", "list", lang="zh_CN.UTF-8").strip() == "没有未处理的告警"
    catalog = Catalog(config.parent / "data" / "catalog.sqlite")
    key = "uncollected_files:bench:ZFY0777-SDCARD-long-key"
    catalog.raise_alarm(key, "uncollected_files", "ZFY0777", "3 file(s) not collected, first: " + LONG)
    try:
        out = edge_agent(config, "alarms", "list")
        assert_fits(out)
        assert key in out.replace("\n", "").replace("│", "").replace(" ", "")
        # In Chinese the custodian is told what to do about the kind, not the daemon's English sentence.
        catalog.raise_alarm("tamper:ZFY0777", "tamper", "01TAMPERED", "stored file 01TAMPERED failed verification")
        for args in (("alarms", "list"), ("status",)):
            chinese = edge_agent(config, *args, lang="zh_CN.UTF-8")
            assert_fits(chinese)
            flat = "".join(chinese.replace("│", "").split())
            assert "已存证据校验失败：请勿操作本工作站，立即报告上级。" in flat, chinese
            assert "failedverification" not in flat, chinese
        assert "failed verification" in edge_agent(config, "alarms", "list", lang="C.UTF-8")
        listed = json.loads(edge_agent(config, "--json", "alarms", "list", lang="zh_CN.UTF-8"))
        assert {a["message"] for a in listed} >= {"stored file 01TAMPERED failed verification"}
    finally:
        catalog.clear_alarm("tamper:ZFY0777")
        catalog.clear_alarm(key)
        catalog.close()


def test_status_speaks_chinese_under_a_chinese_locale_and_json_stays_english(
        imported: tuple[Path, list[dict]]) -> None:
    config, _ = imported
    out = edge_agent(config, "status", lang="zh_CN.UTF-8")
    assert_fits(out)
    assert "各状态文件数" in out and "等待上传到平台" in out and "没有未处理的告警" in out
    assert "Files by state" not in out
    english = edge_agent(config, "status")
    assert "Files by state" in english and "各状态文件数" not in english
    data = json.loads(edge_agent(config, "--json", "status", lang="zh_CN.UTF-8"))
    assert set(data) >= {"files_by_state", "unsynced", "alarms"}
    for args in (["devices", "list"], ["files", "list"], ["verify", "--all"]):
        assert_fits(edge_agent(config, *args, lang="zh_CN.UTF-8"))
    listed = edge_agent(config, "files", "list", lang="zh_CN.UTF-8")
    assert "文件编号" in listed and "状态" in listed


def test_receiver_run_help_names_its_tables() -> None:
    done = subprocess.run([sys.executable, "-m", "edge_agent.cli", "receiver", "run", "--help"],
                          env={**os.environ, "COLUMNS": str(WIDTH)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "( and )" not in done.stdout and "mqtt and receiver" in done.stdout.replace("\n", " ")


def test_import_shows_progress_against_a_known_total(tmp_path: Path) -> None:
    """On a terminal (util-linux `script` gives the command one), the bar counts towards the card's size
    from its first frame: never `0/? bytes`."""
    config_path, _ = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path, "CARD", {"DCIM/A.MP4": 3 << 20, "DCIM/B.MP4": 1 << 20})
    command = (f"{sys.executable} -m edge_agent.cli --config {config_path} import {card} --device ZFY0900 "
               "--reason 'card handed in'")
    done = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": str(WIDTH), "LANG": "C.UTF-8", "TERM": "xterm"})
    assert done.returncode == 0, done.stdout
    frames = [f for f in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", done.stdout).replace("\r", "\n").splitlines()
              if f.startswith("import CARD")]
    assert frames and all("/?" not in f and "/4.2 MB" in f for f in frames), frames


def test_the_demos_live_table_is_readable_at_80_columns() -> None:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    devices = {f"recorder:ZFY00{i:02}": {"discovered": 3, "sealed": 120, "source_cleared": 1000} for i in range(6)}
    devices["camera:gate-east-entrance"] = {"synced": 1234, "sending": 1}
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    console.print(demo.render({"devices": devices, "received": 1234, "alarms": []}, 0.0, ["ZFY0001"]))
    out = console.export_text()
    assert_fits(out)
    header = next(line for line in out.splitlines() if line.startswith("device"))
    assert header.split() == ["device", "found", "staged", "sealed", "sending", "synced", "cleared", "rej."]
    assert "cam gate-east-entrance" in out and "ZFY0005" in out


def test_the_daemons_live_view_in_status_fits_80_columns() -> None:
    from edge_agent.cli.operations import render_daemon

    slot = {"dock": "dock-a", "slot": 3, "device_id": "A123452", "officer_id": "320102456", "state": "ingesting",
            "files_pending": 12, "bytes_copied": 3 << 30, "rate_bps": 48 << 20,
            "last_error": "DCIM/100MEDIA/FILE0003.MP4: [Errno 5] Input/output error"}
    snapshot = {
        "agent": {"version": "0.1.0", "uptime_s": 93784,
                  "disk": {"used_percent": 41.2, "store_bytes": 812 << 30, "days_until_full": 37.0},
                  "sync": {"connected": True, "last_ack_ms": 1796387653391},
                  "clock": {"source": "chrony", "offset_ms": 3}},
        "docks": [slot, {**slot, "slot": 4, "device_id": "unknown:NO_NAME", "state": "source_cleared"}],
        "cameras": [{"name": "gate-east-entrance", "connected": True, "fps": 25.0, "bitrate_kbps": 4096.0,
                     "last_packet_ms": 1796387653391, "gaps_today": 2}],
    }
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    console.print(render_daemon(snapshot))
    out = console.export_text()
    assert_fits(out)
    assert "unknown:NO_NAME" in out and "source_cleared" in out and "gate-east-entrance" in out
