"""Authenticated platform commands (`{root}/{agent}/commands`, DESIGN.md section 5).

The broker's ACL already lets only the platform write an agent's commands; this
is the agent's own check, so a broker misconfiguration or a stolen broker
credential cannot drive the agent. A command is obeyed only if:

- it is signed: `key_id` and `sig` (base64 Ed25519 over the canonical JSON of
  the command without `sig`, as for manifests), or under the 国密 suites
  `sm2_key_id` and `sm2_sig` (evidence/suites.py), by one of the platform keys in
  `mqtt.command_keys` (a PEM file holding one or more public keys, or a
  directory of `*.pem`);
- it names this agent in `agent` (a command signed for one agent cannot be
  replayed to another);
- its `seq` (a positive integer the platform raises with every command it signs
  with that key) is higher than the highest `seq` this agent obeyed from that key
  (`command_seqs` in the catalog). This is what refuses a replay: it holds across
  restarts and whatever the wall clock does (a clock stepped back brings a captured
  command's `ts` into the window again, never its `seq` above the last);
- its `ts` (ms since the epoch) is within `COMMAND_WINDOW_MS` of the agent's
  clock: the window only bounds freshness (a command held back for hours is
  refused even if its `seq` is new);
- its `id` was never obeyed before (ids are kept in the catalog for twice the
  window): a second line of defence for the audit log's sake.

Everything else is refused, logged with the reason and written to the audit
log; nothing about the key material is ever logged. With no `command_keys`
configured every command is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.catalog import Catalog
from edge_agent.clock import now_ms
from edge_agent.config import ConfigError, Problem
from edge_agent.evidence.manifest import ManifestError, verify_signature
from edge_agent.evidence.receipts import load_pem_keys
from edge_agent.evidence.suites import PublicKey

log = logging.getLogger(__name__)

COMMAND_WINDOW_MS = 5 * 60 * 1000


def load_command_keys(path: Path) -> dict[str, PublicKey]:
    """The platform's public keys by key id; ConfigError naming `mqtt.command_keys` if unusable."""
    try:
        keys = load_pem_keys(path)
    except (OSError, ValueError, ManifestError) as exc:
        raise ConfigError("mqtt.command_keys", [Problem("mqtt.command_keys", str(path),
                          f"cannot load the platform's command keys: {exc}")]) from None
    if not keys:
        raise ConfigError("mqtt.command_keys", [Problem("mqtt.command_keys", str(path),
                          "holds no Ed25519 or SM2 public key (PEM 'BEGIN PUBLIC KEY'); give the platform's key file "
                          "or a directory of *.pem")])
    return keys


class CommandRefused(Exception):
    """Why a command was not obeyed."""


class CommandGate:
    """Admits a decoded command (schema-checked) only when it is authentic, fresh and not a replay.

    `clock` is the agent's wall clock (ms); it bounds freshness only, replays are refused by `seq`."""

    def __init__(self, catalog: Catalog, agent_id: str, keys_path: Path | None,
                 window_ms: int = COMMAND_WINDOW_MS, clock: Callable[[], int] = now_ms):
        self.catalog = catalog
        self.agent_id = agent_id
        self.window_ms = window_ms
        self.clock = clock
        self.keys = load_command_keys(keys_path) if keys_path is not None else {}

    def admit(self, command: dict[str, Any]) -> bool:
        """True if `command` may be obeyed; else it is logged and audited as refused."""
        cmd_id = str(command.get("id"))[:128]
        try:
            self._check(command)
        except CommandRefused as exc:
            log.warning("command refused cmd=%r id=%r reason=%s", str(command.get("cmd"))[:64], cmd_id, exc)
            self.catalog.audit("command.refused", subject=cmd_id, reason=str(exc), actor="platform",
                               detail={"cmd": str(command.get("cmd"))[:64], "key_id": str(command.get("key_id"))[:80]})
            return False
        return True

    def _check(self, command: dict[str, Any]) -> None:
        if not self.keys:
            raise CommandRefused("no platform command key is configured (mqtt.command_keys); commands are refused")
        key = self.keys.get(command.get("key_id"))  # type: ignore[arg-type]
        if key is None:
            raise CommandRefused("not signed by a platform key this agent knows (key_id missing or unknown)")
        try:
            verify_signature(command, key)
        except ManifestError as exc:
            raise CommandRefused(f"bad signature: {exc}") from None
        if command.get("agent") != self.agent_id:
            raise CommandRefused(f"addressed to agent {str(command.get('agent'))[:64]!r}, not to this one")
        seq = command.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise CommandRefused("no seq: the platform numbers the commands it signs with each key (a positive "
                                 "integer, higher every time; docs/PROTOCOL.md); this agent refuses unnumbered ones")
        now = self.clock()
        ts = command["ts"]
        if abs(now - ts) > self.window_ms:
            raise CommandRefused(f"ts {ts} is {abs(now - ts) // 1000} s away from this agent's clock "
                                 f"(window {self.window_ms // 1000} s): stale or replayed")
        key_id, ids, seqs = command["key_id"], self.catalog.command_ids, self.catalog.command_seqs
        with self.catalog.transaction():  # checked and remembered atomically; a refusal forgets nothing
            last = seqs.last(key_id)
            if last is not None and seq <= last:
                raise CommandRefused(f"seq {seq} is not above {last}, the last obeyed from {key_id}: replay "
                                     "(or the platform reset its numbering: it must continue above the last)")
            ids.forget_before(now - 2 * self.window_ms)
            if ids.seen(command["id"]):
                raise CommandRefused("this command id was already obeyed: replay")
            ids.remember(command["id"], ts, now)
            seqs.advance(key_id, seq, command["id"], now)
            self.catalog.audit("command.accepted", subject=str(command["id"]), actor="platform",
                               detail={"cmd": command["cmd"], "key_id": key_id, "seq": seq})
