"""A file's life: its states, the only edges between them, and the named sets of states the rest of the
agent asks about. Each set is defined here once; nothing else lists states by hand.

The SQL fragments derived from the sets list the states in declaration order, so that a fragment is the
same text on every run: SQLite matches a partial index's WHERE clause against a query's by its terms
(`files_stored_size`, `files_send_order`), and catalogs made by earlier versions hold those indexes.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class State(StrEnum):
    DISCOVERED = "discovered"
    STAGED = "staged"
    SEALED = "sealed"
    SENDING = "sending"
    SYNCED = "synced"
    SOURCE_CLEARED = "source_cleared"
    PURGED = "purged"
    REJECTED = "rejected"


# The whole state machine. A transition not listed here is a bug, refused loudly.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.DISCOVERED: frozenset({State.STAGED, State.REJECTED}),
    State.STAGED: frozenset({State.SEALED, State.DISCOVERED, State.REJECTED}),
    State.SEALED: frozenset({State.SENDING}),
    State.SENDING: frozenset({State.SYNCED, State.SEALED, State.REJECTED}),
    State.SYNCED: frozenset({State.SOURCE_CLEARED, State.PURGED}),
    State.SOURCE_CLEARED: frozenset({State.PURGED}),
    State.PURGED: frozenset(),
    # A receiver's rejection is retried only by a custodian's decision (sync now --retry-rejected).
    State.REJECTED: frozenset({State.SEALED, State.DISCOVERED}),
}

# Not on the platform yet: what R1's alarm counts once one waits longer than health.unsynced_alarm_h.
UNSYNCED: frozenset[State] = frozenset({State.DISCOVERED, State.STAGED, State.SEALED, State.SENDING,
                                        State.REJECTED})
# Waiting for upload: what the uplink sends, in lane order.
SYNC_QUEUE: frozenset[State] = frozenset({State.SEALED, State.SENDING})
# Whose bytes are in the local store (what counts against max_disk_gb), given a store_path.
STORED: frozenset[State] = frozenset({State.STAGED, State.SEALED, State.SENDING, State.SYNCED,
                                      State.SOURCE_CLEARED, State.REJECTED})
# With a signed manifest: what `verify` and the scrub check.
SEALED_STATES: frozenset[State] = frozenset({State.SEALED, State.SENDING, State.SYNCED, State.SOURCE_CLEARED,
                                             State.PURGED, State.REJECTED})
# Confirmed by the platform (a rejection alarm clears once its file is here).
CONFIRMED: frozenset[State] = frozenset({State.SYNCED, State.SOURCE_CLEARED, State.PURGED})
# Confirmed and still on disk: the only states retention may purge from.
PURGEABLE_STATES: frozenset[State] = CONFIRMED & STORED
# Not copied yet: a docked volume still has work while one of its files is here.
PENDING_COPY: frozenset[State] = frozenset({State.DISCOVERED, State.STAGED})


def ordered(states: Iterable[str]) -> list[State]:
    """`states` in declaration order (the order of SQL fragments and of reports)."""
    wanted = {State(s) for s in states}
    return [s for s in State if s in wanted]


def state_in(states: Iterable[str], column: str = "state") -> str:
    """`column IN ('a', 'b')` for a set of states, in declaration order (see the module's docstring)."""
    return f"{column} IN ({', '.join(repr(str(s)) for s in ordered(states))})"


# Files whose bytes are in the local store, as a WHERE fragment (also the partial index files_stored_size).
STORED_FILES = f"{state_in(STORED)} AND store_path IS NOT NULL"
