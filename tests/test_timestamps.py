"""RFC 3161 time-stamps on checkpoints, against a real TSA (`openssl ts -reply` behind HTTP): each checkpoint's
token is kept beside it, travels in the next checkpoint, and `edge-agent verify` checks it; an unreachable
authority is an alarm, never a lost checkpoint."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.catalog import Catalog
from edge_agent.evidence.manifest import AgentKey
from edge_agent.evidence.timestamps import token_problem
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from tests.helpers import agent_config
from tests.peers.tsa import OpensslTsa
from tests.sync_support import CLI


@pytest.fixture
def tsa(tmp_path: Path) -> Iterator[OpensslTsa]:
    authority = OpensslTsa(tmp_path / "tsa")
    yield authority
    authority.close()


def sealer_for(tmp_path: Path, **evidence: object) -> tuple[Path, Sealer, Catalog, StoreLayout]:
    path, config = agent_config(tmp_path, evidence=evidence)
    layout = StoreLayout(config.agent.data_dir).open()
    catalog = Catalog(config.catalog_path)
    return path, Sealer(catalog, AgentKey.load_or_create(layout.keys), layout, config), catalog, layout


def test_a_checkpoint_is_time_stamped_and_its_token_travels_in_the_next_checkpoint(tmp_path: Path,
                                                                                   tsa: OpensslTsa) -> None:
    toml, sealer, catalog, layout = sealer_for(tmp_path, tsa_url=tsa.url, tsa_ca=str(tsa.root))
    try:
        first = sealer.checkpoint("periodic")
        token = layout.checkpoint_token_path(first["checkpoint_id"]).read_bytes()
        data = layout.checkpoint_path(first["checkpoint_id"]).read_bytes()
        assert tsa.requests == 1
        assert token_problem(token, data, tsa.root) is None
        assert token_problem(token, data + b" ", tsa.root) is not None, "the token binds the checkpoint's bytes"
        catalog.audit("something", subject="x")
        second = sealer.checkpoint("periodic")
        carried = second["previous_timestamp"]
        assert (carried["checkpoint_id"], base64.b64decode(carried["token"])) == (first["checkpoint_id"], token)
    finally:
        catalog.close()
    ok = subprocess.run([*CLI, "--config", str(toml), "verify", "--all", "--reason", "t"], capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    path = layout.checkpoint_token_path(first["checkpoint_id"])
    path.chmod(0o644)
    path.write_bytes(token[:-8] + b"\x00" * 8)                  # the token altered
    bad = subprocess.run([*CLI, "--config", str(toml), "--json", "verify", "--all", "--reason", "t"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert f"checkpoint {first['checkpoint_id']}" in bad.stdout and "RFC 3161 token" in bad.stdout


def test_an_unreachable_authority_raises_timestamp_failed_and_the_checkpoint_stands(tmp_path: Path) -> None:
    _toml, sealer, catalog, layout = sealer_for(tmp_path, tsa_url="http://127.0.0.1:9/tsa", tsa_timeout_s=2)
    try:
        doc = sealer.checkpoint("periodic")
        assert doc is not None and catalog.documents.head()[0] == 1
        assert not layout.checkpoint_token_path(doc["checkpoint_id"]).exists()
        alarms = [a for a in catalog.active_alarms() if a["kind"] == "timestamp_failed"]
        assert alarms and "evidence.tsa_url" in alarms[0]["message"]
    finally:
        catalog.close()
