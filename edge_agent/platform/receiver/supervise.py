"""The receiver supervised: liveness of its threads, as the agent has (ops/liveness.py), and systemd's watchdog.

Each of the receiver's loops (checker, worker, syncer, sweeper, the store's hasher, the MQTT connection) holds a
`protocol.heartbeat.Heartbeat` and is described by a `Vital`. Every `liveness.check_s` the supervisor looks:

- dead (its thread ended while the receiver runs): it is started again and `event=component_restarted` logged.
  A message the dead thread held was not PUBACKed; the agent asks again after its ack timeout.
- stuck (silent longer than `liveness.stall_s` while not idle): a Python thread cannot be killed, so the
  process exits with EXIT_STUCK, `event=component_stuck` logged first, and systemd (`Restart=on-failure`)
  starts it again: every commit step is resumable (store.py) and unacknowledged messages come again.
- `WATCHDOG=1` goes to systemd after a check that found every thread live, and only then: a supervisor that
  stops looking (or a process wedged as a whole) is restarted by systemd after `WatchdogSec`.

`EDGE_AGENT_RECEIVER_FAULT=<thread>:die|hang` (tests only, as `EDGE_AGENT_RECEIVER_CRASH_AT`): the named
thread (e.g. `receiver-worker`) raises out of its loop, or blocks forever, the first time round.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from edge_agent.protocol import sdnotify
from edge_agent.protocol.heartbeat import Heartbeat, Vital

log = logging.getLogger(__name__)

EXIT_STUCK = 70   # EX_SOFTWARE: systemd's Restart=on-failure starts the receiver again
FAULT_ENV = "EDGE_AGENT_RECEIVER_FAULT"

_fault_lock = threading.Lock()
_fault_fired = False
_current = threading.local()   # .heartbeat: the Loop running on this thread


def pulse() -> None:
    """Progress inside one long step (a commit re-reading a large file): beats the heartbeat of the Loop this
    thread runs, if any, so the step is not taken for a stuck thread."""
    heartbeat = getattr(_current, "heartbeat", None)
    if heartbeat is not None:
        heartbeat.beat()


class InjectedFault(RuntimeError):
    """Raised out of a loop by `EDGE_AGENT_RECEIVER_FAULT=<thread>:die` (fault-injection tests)."""


def inject_fault(thread_name: str) -> None:
    """Fault injection: if `EDGE_AGENT_RECEIVER_FAULT` names this thread, die (raise) or hang (block forever),
    once per process. A no-op otherwise."""
    global _fault_fired
    wanted, _, mode = os.environ.get(FAULT_ENV, "").partition(":")
    if wanted != thread_name:
        return
    with _fault_lock:
        if _fault_fired:
            return
        _fault_fired = True
    log.warning("injected fault thread=%s mode=%s", thread_name, mode)
    if mode == "hang":
        threading.Event().wait()
    raise InjectedFault(f"{thread_name}: injected fault ({FAULT_ENV})")


def _exit_now(code: int) -> None:
    """Exit at once (a stuck thread would keep a normal exit waiting), the log flushed first."""
    logging.shutdown()
    os._exit(code)


class Loop:
    """One of the receiver's long-lived threads as the supervisor sees it: `target(heartbeat)` runs until the
    receiver stops, beating each time round (`idle()` before an open-ended wait); restartable."""

    def __init__(self, name: str, target: Callable[[Heartbeat], None], stopping: threading.Event):
        self.name = name
        self.heartbeat = Heartbeat(name)
        self._target = target
        self._stopping = stopping
        self.thread = self._new()

    def _new(self) -> threading.Thread:
        return threading.Thread(target=self._run, name=self.name, daemon=True)

    def _run(self) -> None:
        _current.heartbeat = self.heartbeat
        self.heartbeat.beat()
        inject_fault(self.name)
        self._target(self.heartbeat)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.thread.join(timeout)

    def alive(self) -> bool:
        """False if the thread ended while the receiver runs (it died)."""
        return self._stopping.is_set() or not self.thread.ident or self.thread.is_alive()

    def restart(self) -> None:
        self.thread = self._new()
        self.thread.start()

    def vital(self) -> Vital:
        return Vital(self.name, self.heartbeat, self.alive, self.restart)


class Supervisor:
    """Looks at `vitals()` every `check_s`: restarts the dead, exits the process on a stuck one, feeds the
    systemd watchdog only after a check found every one live."""

    def __init__(self, vitals: Callable[[], list[Vital]], *, check_s: float, stall_s: float,
                 exit_process: Callable[[int], None] | None = None):
        self.vitals = vitals
        self.check_s = check_s
        self.stall_s = stall_s
        self.exit_process = exit_process or _exit_now
        self.restarts: dict[str, int] = {}
        self.watchdog_s = sdnotify.watchdog_interval_s()
        self._last_ping = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receiver-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.check_s):
            try:
                live = self.check()
            except Exception:   # the supervisor must not die of what it looks at; unfed, systemd steps in
                log.exception("receiver supervisor check failed")
                continue
            if live:
                self._ping()

    def check(self) -> bool:
        """One look at every vital; True if every thread is live (after restarting the dead)."""
        live = True
        for vital in self.vitals():
            if not vital.alive():
                self.restarts[vital.name] = self.restarts.get(vital.name, 0) + 1
                log.error("event=component_restarted component=%s restarts=%d: its thread had died; started "
                          "again", vital.name, self.restarts[vital.name])
                if vital.restart is None:
                    live = False
                    continue
                vital.restart()
                vital.heartbeat.beat()
            elif (silent := vital.heartbeat.silent_s()) > self.stall_s:
                log.critical("event=component_stuck component=%s silent_s=%.0f stall_s=%g: a stuck thread cannot "
                             "be recovered in process; exiting %d for systemd to restart the receiver",
                             vital.name, silent, self.stall_s, EXIT_STUCK)
                sdnotify.notify(f"STATUS=stuck: {vital.name}")
                self.exit_process(EXIT_STUCK)
                return False
        return live

    def _ping(self) -> None:
        now = time.monotonic()
        if self.watchdog_s and now - self._last_ping >= min(self.watchdog_s, self.check_s):
            self._last_ping = now
            sdnotify.notify("WATCHDOG=1")
