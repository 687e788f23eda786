"""kill -9 at seeded random points across ingest, seal, send and clear, of the agent and of the receiver;
restart, and run to completion: 0 files lost, 0 stored twice, 0 recorder files deleted before a matching
ack, and the manifest, document and audit chains verify.

The default run makes FAULTS_KILLS (10) kill points; `scripts/torture.sh` makes 100 or more. Every kill is
printed with its seed, so a failure replays with FAULTS_SEED=<seed>.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.rig import (
    SEED_ENV,
    ClearWatch,
    Process,
    Rig,
    agent_process,
    receiver_process,
    seed,
    wait_drained,
)
from tests.helpers import wait_for
from tests.peers.mosquitto import Mosquitto

KILLS = int(os.environ.get("FAULTS_KILLS", "10"))

# Where to strike: the condition that says the pipeline is at that phase now, and whom to kill.
Phase = tuple[str, str, Callable[[Rig, int], bool]]


def _copying(rig: Rig, _before: int) -> bool:
    return any(p.stat().st_size > 0 for p in (rig.data_dir / "staging").glob("*.part")) \
        if (rig.data_dir / "staging").exists() else False


def _sealed_more(rig: Rig, before: int) -> bool:
    return rig.count(("sealed", "sending", "synced", "source_cleared")) > before


def _sending(rig: Rig, _before: int) -> bool:
    return rig.count(("sending",)) > 0


def _synced_not_cleared(rig: Rig, _before: int) -> bool:
    return rig.count(("synced",)) > 0


def _receiving(rig: Rig, _before: int) -> bool:
    incoming = rig.store_dir / "incoming"
    return incoming.exists() and any(incoming.rglob("chunks"))   # a chunk record (receiver store)


PHASES: list[Phase] = [
    ("ingest", "agent", _copying),
    ("seal", "agent", _sealed_more),
    ("send", "agent", _sending),
    ("clear", "agent", _synced_not_cleared),
    ("send", "receiver", _receiving),
    ("assemble", "receiver", _sending),
]


def strike(rig: Rig, rng: random.Random, victim: Process, condition: Callable[[Rig, int], bool],
           jitter_s: float) -> bool:
    """Wait (bounded) for the phase, add a random delay, kill -9. True if the phase was seen."""
    before = rig.count(("sealed", "sending", "synced", "source_cleared"))
    try:
        wait_for(lambda: condition(rig, before) or not victim.running, timeout=8, interval=0.005)
        seen = victim.running
    except TimeoutError:
        seen = False
    time.sleep(rng.uniform(0, jitter_s))  # a random instant inside the phase, not its first millisecond
    victim.kill9()
    return seen


def test_kill_9_anywhere_loses_nothing_stores_nothing_twice_clears_nothing_early(tmp_path: Path,
                                                                                mosquitto: Mosquitto) -> None:
    run_seed = seed()
    rng = random.Random(run_seed)
    print(f"crash suite seed={run_seed} kills={KILLS} (replay: {SEED_ENV}={run_seed} FAULTS_KILLS={KILLS})")
    rig = Rig(tmp_path, mosquitto.port)
    agent, receiver = agent_process(rig), receiver_process(rig)
    watch = ClearWatch(rig)
    watch.start()
    rig.add_files([rng.choice([40_000, 300_000, 1_200_000]) for _ in range(4)] + [6_000_000], rng)
    receiver.start()
    agent.start()
    seen_phases: dict[str, int] = {}
    try:
        for kill in range(KILLS):
            name, who, condition = rng.choice(PHASES)
            victim = agent if who == "agent" else receiver
            if name in ("ingest", "seal"):  # a copy to strike: a new recording, large enough to take a while
                rig.add_files([rng.randrange(2_000_000, 8_000_000)], rng)
            elif rng.random() < 0.5:  # keep the recorder busy: new recordings arrive while others sync
                rig.add_files([rng.choice([20_000, 500_000, 2_500_000]) for _ in range(rng.randint(1, 3))], rng)
            seen = strike(rig, rng, victim, condition, jitter_s=0.15)
            if seen:
                seen_phases[f"{who}:{name}"] = seen_phases.get(f"{who}:{name}", 0) + 1
            print(f"kill {kill + 1}/{KILLS}: {who} during {name} (phase seen: {seen})")
            victim.start()
        wait_drained(rig, timeout=120 + 2 * len(rig.sources))
    finally:
        watch.stop()
        agent.terminate()
        receiver.terminate()
    print(f"kill points by phase: {seen_phases}; files: {len(rig.sources)}")
    assert not watch.violations, f"G2: recorder files deleted before the receiver held them: {watch.violations}"
    assert watch.cleared == set(rig.sources)
    rig.check_delivered()
    rig.check_chains()
    assert sum(seen_phases.values()) >= KILLS // 2, f"too few kills hit their phase: {seen_phases}"
