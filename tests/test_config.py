"""Config: every problem named with key, value and what is valid; the daemon refuses a bad config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config
from edge_agent.sources.recorders import load_models
from tests.helpers import agent_config

ROOT = Path(__file__).resolve().parents[1]
EDGE_AGENT = [str(Path(sys.executable).parent / "edge-agent")]

BAD = """
[agent]
id = "ws gulou/01"
site = "nj-gulou"
unit = "鼓楼区城管大队"
data_dir = "{data}"
max_disk_gb = -1
colour = "red"

[mqtt]
port = 70000

[[docks]]
name = "dock-a"
kind = "floppy"

[[docks]]
name = "bench"
kind = "directory"

[[cameras]]
name = "cam-1"
rtsp = "rtsp://127.0.0.1/cam"
location = "酒店"
location_kind = "hotel_room"
"""

# (key, value as written, a word of what is valid)
EXPECTED = [
    ("agent.id", "'ws gulou/01'", "letters, digits"),
    ("agent.max_disk_gb", "-1", "greater than 0"),
    ("agent.colour", "'red'", "unknown key"),
    ("mqtt.port", "70000", "65535"),
    ("docks[0].kind", "'floppy'", "usb, directory"),
    ("docks[1].root", None, "required"),
    ("cameras[0].location_kind", "'hotel_room'", "R11"),
]


def write_bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(BAD.format(data=tmp_path / "data"), encoding="utf-8")
    return path


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGE_AGENT, *args], capture_output=True, text=True, timeout=60)


def test_config_check_lists_every_problem_with_key_value_and_what_is_valid(tmp_path: Path) -> None:
    path = write_bad(tmp_path)
    human = edge_agent("config", "check", str(path))
    assert human.returncode == 2
    text = " ".join(human.stdout.split())          # rich wraps long lines
    for key, value, valid in EXPECTED:
        assert f"{key}{'' if value is None else ' = ' + value}" in text, key
        assert valid in text, valid
    as_json = edge_agent("--json", "config", "check", str(path))
    assert as_json.returncode == 2
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    found = {p["key"]: p for p in report["problems"]}
    assert sorted(found) == sorted(key for key, _, _ in EXPECTED)
    for key, value, valid in EXPECTED:
        assert valid in found[key]["message"]
        if value is not None:
            assert found[key]["value"] == value


def test_daemon_refuses_to_start_on_an_invalid_config(tmp_path: Path) -> None:
    path = write_bad(tmp_path)
    result = edge_agent("--config", str(path), "run")
    assert result.returncode == 2
    assert "agent.max_disk_gb" in result.stderr and "docks[0].kind" in result.stderr
    assert not (tmp_path / "data").exists()          # nothing was created or touched


def test_valid_config_checks_ok_and_loads_typed(tmp_path: Path) -> None:
    path, _ = agent_config(tmp_path, docks=[{"name": "bench", "kind": "directory", "root": str(tmp_path / "d")}])
    result = edge_agent("--json", "config", "check", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) | {"path": ""} == {"ok": True, "path": "", "agent": "ws-test-01", "docks": 1,
                                                        "cameras": 0}
    cfg = load_config(path)
    assert cfg.docks[0].root == tmp_path / "d" and cfg.agent.max_disk_gb == 50.0


def test_unreadable_or_malformed_config_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "nope.toml")
    assert missing.value.problems[0].key == "(file)" and "cannot read" in str(missing.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[agent\nid = 1\n")
    with pytest.raises(ConfigError) as syntax:
        load_config(broken)
    assert syntax.value.problems[0].key == "(syntax)"


def test_recorder_model_table_is_shipped_and_checked(tmp_path: Path) -> None:
    assert (ROOT / "config/recorders.toml").read_bytes() == (ROOT / "edge_agent/data/recorders.toml").read_bytes()
    assert {m.name for m in load_models()} >= {"ZFY-GA-2016", "HK-DSJ-A2", "DH-MPT-G2"}
    bad = tmp_path / "recorders.toml"
    bad.write_text('[[models]]\nname = "X"\nvendor_id = 1\n'
                   '[[models]]\nname = "Y"\nvendor_id = 2\nproduct_id = 3\nfile_pattern = "^(?P<device>x)$"\n'
                   '[[models]]\nname = "Z"\nvendor_id = 2\nproduct_id = 4\nfile_pattern = "(?P<start>["\n')
    with pytest.raises(ConfigError) as exc:
        load_models(bad)
    problems = {p.key: p.message for p in exc.value.problems}
    assert sorted(problems) == ["models[0].product_id", "models[1].file_pattern", "models[2].file_pattern"]
    assert "named group 'start'" in problems["models[1].file_pattern"]
    assert "bad regex" in problems["models[2].file_pattern"]
