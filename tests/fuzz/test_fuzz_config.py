"""Fuzzing configuration: whatever a config file holds, loading it either gives a typed AgentConfig or
raises ConfigError naming each problem; never another exception, never a traceback for the custodian."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import (
    AgentConfig,
    ConfigError,
    ReceiverConfig,
    load_config,
    load_receiver_config,
    parse_config,
    parse_receiver_config,
)

VALID: dict[str, Any] = {
    "agent": {"id": "ws-gulou-01", "site": "nj-gulou", "unit": "鼓楼区城管大队", "data_dir": "/var/lib/edge-agent"},
    "mqtt": {"host": "127.0.0.1", "port": 1883, "root": "evidence/v2"},
    "docks": [{"name": "bench", "kind": "directory", "root": "/srv/dock-sim"},
              {"name": "dock-a", "kind": "usb", "mount_root": "/media/edge-dock", "clear_after_sync": True}],
    "cameras": [{"name": "gate-east", "rtsp": "rtsp://10.0.0.21/stream", "location": "中山路口",
                 "location_kind": "street"}],
    "retention": {"routine_days": 180},
}
RECEIVER: dict[str, Any] = {"mqtt": {"host": "127.0.0.1", "port": 1883},
                            "receiver": {"store_dir": "/var/lib/edge-receiver", "shared_subscription": True}}

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["usb", "directory", "street", "toilet", "rtsp://x", "http://x", "\x00", "",
                                     "evidence/#", "a" * 300]), st.datetimes(), st.dates(), st.times())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def _check(data: Any, parse: Any = parse_config, kind: type = AgentConfig) -> None:
    try:
        cfg = parse(data, "fuzz.toml")
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must name at least one problem"
        for problem in exc.problems:
            assert problem.key and problem.message
        assert "fuzz.toml" in str(exc)
    else:
        assert isinstance(cfg, kind)


@given(values)
@settings(max_examples=300, deadline=None)
def test_any_document_shape_gives_a_config_or_a_config_error(data: Any) -> None:
    _check(data)
    _check(data, parse_receiver_config, ReceiverConfig)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


def _replace(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace(doc[head], rest, new)}
    copy = list(doc)
    copy[head] = _replace(doc[head], rest, new)
    return copy


def _edited(base: dict[str, Any], edits: list[tuple[tuple[Any, ...], Any]]) -> Any:
    doc: Any = base
    for path, new in edits:
        try:
            doc = _replace(doc, path, new)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed this branch
    return doc


@given(st.lists(st.tuples(st.sampled_from(_paths(VALID)), values), min_size=1, max_size=4))
@settings(max_examples=400, deadline=None)
def test_a_valid_config_with_any_values_replaced_gives_a_config_or_a_config_error(
        edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    _check(_edited(VALID, edits))


@given(st.lists(st.tuples(st.sampled_from(_paths(RECEIVER)), values), min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_a_valid_receiver_config_with_any_values_replaced_gives_a_config_or_a_config_error(
        edits: list[tuple[tuple[Any, ...], Any]]) -> None:
    _check(_edited(RECEIVER, edits), parse_receiver_config, ReceiverConfig)


@given(st.binary(max_size=600) | st.text(max_size=600).map(lambda t: t.encode("utf-8", "surrogatepass")))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_file_bytes_give_a_config_or_a_config_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(raw)
    for load in (load_config, load_receiver_config):
        try:
            load(path)
        except ConfigError as exc:
            assert exc.problems and str(path) in str(exc)


def test_the_fuzzing_base_documents_are_themselves_valid() -> None:
    assert isinstance(parse_config(VALID), AgentConfig)
    assert isinstance(parse_receiver_config(RECEIVER), ReceiverConfig)
