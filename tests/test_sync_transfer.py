"""One file's transfer protocol as a pure state machine (sync/transfer.py): every transition, without MQTT."""

from __future__ import annotations

import pytest

from edge_agent.protocol.wire import Ack
from edge_agent.sync.transfer import (
    RESYNC_INTERVAL_S,
    MarkRejected,
    MarkSynced,
    Phase,
    SendManifest,
    SendQuery,
    Transfer,
    verdict,
)

FILE_ID = "01M8A4CX94HKS6DD50ABZSJKXQ"
SHA = "ab" * 32
OTHER_SHA = "cd" * 32
TIMEOUT = 30.0


def transfer(chunks: int = 10, *, resumed: bool = False, now: float = 100.0) -> Transfer:
    machine = Transfer(FILE_ID, size=chunks * 4 - 1, sha256=SHA, chunk_size=4, last_heard=now)
    machine.start(resumed=resumed, now=now)
    return machine


def receiving(have: list[list[int]] | None = None, reason: str | None = None) -> Ack:
    return Ack(FILE_ID, "receiving", have or [], None, reason)


def send_all(machine: Transfer, now: float = 100.0) -> list[int]:
    sent = []
    while (seq := machine.next_seq()) is not None:
        machine.chunk_sent(seq, now)
        sent.append(seq)
    return sent


# -- start ------------------------------------------------------------------------------------------


def test_a_sealed_file_starts_with_its_manifest_and_streams_at_once() -> None:
    machine = Transfer(FILE_ID, size=10, sha256=SHA, chunk_size=4, last_heard=0.0)
    assert machine.phase == Phase.NEW and machine.next_seq() is None
    assert machine.start(resumed=False, now=5.0) == [SendManifest()]
    assert machine.phase == Phase.STREAMING and machine.last_heard == 5.0
    assert machine.total == 3 and send_all(machine) == [0, 1, 2]


def test_a_file_already_sending_before_a_restart_asks_first_and_sends_nothing_until_the_answer() -> None:
    machine = Transfer(FILE_ID, size=10, sha256=SHA, chunk_size=4, last_heard=0.0)
    assert machine.start(resumed=True, now=5.0) == [SendManifest(), SendQuery()]
    assert machine.phase == Phase.QUERYING and machine.next_seq() is None


def test_start_is_said_once() -> None:
    machine = transfer()
    assert machine.start(resumed=True, now=200.0) == []
    assert machine.phase == Phase.STREAMING


def test_a_zero_byte_file_has_no_chunks_only_its_manifest() -> None:
    machine = Transfer(FILE_ID, size=0, sha256=SHA, chunk_size=4, last_heard=0.0)
    assert machine.start(resumed=False, now=0.0) == [SendManifest()]
    assert machine.total == 0 and machine.next_seq() is None


# -- receiving ----------------------------------------------------------------------------------------


def test_receiving_records_what_is_held_and_only_what_it_lacks_is_sent() -> None:
    machine = transfer(chunks=6)
    assert send_all(machine) == [0, 1, 2, 3, 4, 5]
    assert machine.receiving(receiving([[0, 2]]), now=110.0) == []
    assert sorted(machine.outstanding) == [3, 4, 5] and machine.last_heard == 110.0
    assert machine.phase == Phase.STREAMING and machine.next_seq() is None   # 3..5 still out


def test_the_answer_to_a_query_resends_exactly_what_have_lacks() -> None:
    machine = transfer(chunks=6, resumed=True)
    assert machine.receiving(receiving([[0, 1], [4, 4]]), now=101.0) == []
    assert machine.phase == Phase.STREAMING and machine.outstanding == {}
    assert send_all(machine) == [2, 3, 5]


def test_a_reason_sends_the_manifest_again_and_everything_have_lacks() -> None:
    machine = transfer(chunks=4, now=100.0)
    send_all(machine)
    later = 100.0 + RESYNC_INTERVAL_S + 0.5
    assert machine.receiving(receiving([[1, 1]], reason="no manifest for this file"), now=later) == [SendManifest()]
    assert machine.phase == Phase.STREAMING and machine.last_resync == later
    assert send_all(machine) == [0, 2, 3]


def test_reasons_within_a_second_of_the_last_manifest_back_off() -> None:
    machine = transfer(chunks=4, now=100.0)
    send_all(machine)
    assert machine.receiving(receiving([[0, 0]], reason="no manifest for this file"), now=100.5) == []
    assert sorted(machine.outstanding) == [1, 2, 3]   # `have` still counts; nothing is resent yet
    assert machine.receiving(receiving([], reason="no manifest for this file"), now=101.5) == [SendManifest()]


def test_a_busy_receiver_is_left_alone_until_the_ack_timeout() -> None:
    """`busy`: the receiver cannot take a new transfer now. Nothing is sent (no manifest, no chunks) until the
    ack timeout asks again with manifest + query."""
    machine = transfer()
    send_all(machine)
    assert machine.receiving(receiving(reason="busy"), 102.0) == []
    assert machine.next_seq() is None and machine.phase == Phase.QUERYING
    assert machine.receiving(receiving(reason="busy"), 110.0) == []
    assert machine.timed_out(110.0 + TIMEOUT - 1, TIMEOUT) == []
    assert machine.timed_out(110.0 + TIMEOUT, TIMEOUT) == [SendManifest(), SendQuery()]
    assert machine.receiving(receiving(), 141.0) == [] and machine.next_seq() == 0


def test_a_reason_while_querying_ends_the_query_too() -> None:
    machine = transfer(chunks=3, resumed=True, now=100.0)
    assert machine.receiving(receiving([[0, 0]], reason="chunk 1 dropped: bad sha256"), now=102.0) \
        == [SendManifest()]
    assert machine.phase == Phase.STREAMING and send_all(machine) == [1, 2]


def test_receiving_before_start_or_after_a_verdict_changes_nothing() -> None:
    fresh = Transfer(FILE_ID, size=10, sha256=SHA, chunk_size=4, last_heard=0.0)
    assert fresh.receiving(receiving([[0, 2]]), now=1.0) == [] and len(fresh.have) == 0
    done = transfer()
    done.settled(Ack(FILE_ID, "complete", [], SHA, None))
    assert done.receiving(receiving([[0, 2]], reason="x"), now=500.0) == [] and done.phase == Phase.SYNCED


# -- verdicts -----------------------------------------------------------------------------------------


def test_complete_with_the_sealed_sha256_syncs() -> None:
    machine = transfer()
    assert machine.settled(Ack(FILE_ID, "complete", [], SHA, None)) == [MarkSynced(SHA)]
    assert machine.phase == Phase.SYNCED and machine.next_seq() is None


def test_complete_with_another_sha256_is_a_rejection_naming_both() -> None:
    machine = transfer()
    [action] = machine.settled(Ack(FILE_ID, "complete", [], OTHER_SHA, None))
    assert isinstance(action, MarkRejected) and OTHER_SHA in action.reason and SHA in action.reason
    assert machine.phase == Phase.REJECTED


def test_rejected_carries_the_receivers_reason() -> None:
    machine = transfer(resumed=True)
    assert machine.settled(Ack(FILE_ID, "rejected", [], None, "signature does not verify")) \
        == [MarkRejected("signature does not verify")]
    assert machine.phase == Phase.REJECTED


def test_a_second_verdict_is_ignored() -> None:
    machine = transfer()
    machine.settled(Ack(FILE_ID, "complete", [], SHA, None))
    assert machine.settled(Ack(FILE_ID, "rejected", [], None, "late")) == []
    assert machine.phase == Phase.SYNCED


def test_verdict_refuses_a_receiving_ack() -> None:
    with pytest.raises(ValueError, match="not a verdict"):
        verdict(receiving(), SHA)


# -- strict reader: optional ack fields absent ------------------------------------------------------------


def test_acks_without_their_optional_fields_are_read_as_empty() -> None:
    ack = Ack.from_json({"file_id": FILE_ID, "state": "receiving"})
    assert (ack.have, ack.sha256, ack.reason) == ([], None, None)
    machine = transfer(chunks=2, resumed=True)
    assert machine.receiving(ack, now=101.0) == []          # the answer to the query: nothing held
    assert send_all(machine) == [0, 1]


def test_complete_without_a_sha256_never_syncs() -> None:
    machine = transfer()
    [action] = machine.settled(Ack.from_json({"file_id": FILE_ID, "state": "complete"}))
    assert isinstance(action, MarkRejected) and machine.phase == Phase.REJECTED


def test_rejected_without_a_reason_still_says_something() -> None:
    assert verdict(Ack.from_json({"file_id": FILE_ID, "state": "rejected"}), SHA) == MarkRejected("no reason given")


def test_a_receiving_ack_without_have_keeps_what_is_out_unacked() -> None:
    machine = transfer(chunks=3)
    send_all(machine)
    assert machine.receiving(Ack.from_json({"file_id": FILE_ID, "state": "receiving", "reason": None}), 101.0) == []
    assert sorted(machine.outstanding) == [0, 1, 2]


# -- reconnects, resync, timeouts ---------------------------------------------------------------------


def test_a_reconnect_forgets_what_is_out_and_asks() -> None:
    machine = transfer(chunks=3)
    send_all(machine)
    assert machine.reconnected(now=150.0) == [SendManifest(), SendQuery()]
    assert machine.phase == Phase.QUERYING and machine.outstanding == {} and machine.cursor == 0
    assert machine.last_heard == machine.last_resync == 150.0


def test_resync_asks_a_file_that_waits_for_an_answer_or_has_nothing_out() -> None:
    querying = transfer(resumed=True)
    assert querying.resync(now=120.0) == [SendManifest(), SendQuery()]
    idle = transfer(chunks=2)
    send_all(idle)
    idle.receiving(receiving([[0, 1]]), now=101.0)
    assert idle.resync(now=120.0) == [SendManifest(), SendQuery()]


def test_resync_leaves_a_file_with_chunks_out_alone() -> None:
    machine = transfer(chunks=3)
    send_all(machine)
    assert machine.resync(now=120.0) == [] and machine.phase == Phase.STREAMING


def test_no_ack_for_the_timeout_while_chunks_are_out_queries() -> None:
    machine = transfer(chunks=3, now=100.0)
    send_all(machine, now=100.0)
    assert machine.timed_out(100.0 + TIMEOUT - 1, TIMEOUT) == []
    assert machine.timed_out(100.0 + TIMEOUT, TIMEOUT) == [SendManifest(), SendQuery()]
    assert machine.phase == Phase.QUERYING


def test_an_unanswered_query_is_asked_again_after_the_timeout() -> None:
    machine = transfer(resumed=True, now=100.0)
    assert machine.timed_out(100.0 + TIMEOUT, TIMEOUT) == [SendManifest(), SendQuery()]
    assert machine.last_heard == 100.0 + TIMEOUT


def test_everything_sent_and_acked_but_no_verdict_queries_after_the_timeout() -> None:
    machine = transfer(chunks=2, now=100.0)
    send_all(machine)
    machine.receiving(receiving([[0, 1]]), now=101.0)
    assert machine.timed_out(101.0 + TIMEOUT, TIMEOUT) == [SendManifest(), SendQuery()]


def test_a_silent_file_with_chunks_still_to_send_is_not_a_lost_ack() -> None:
    machine = transfer(chunks=3, now=100.0)   # the window was full elsewhere: nothing went out yet
    assert machine.timed_out(100.0 + 10 * TIMEOUT, TIMEOUT) == []


def test_the_ack_clock_starts_with_the_first_chunk_out() -> None:
    machine = transfer(chunks=3, now=100.0)
    machine.chunk_sent(0, now=160.0)
    machine.chunk_sent(1, now=170.0)
    assert machine.last_heard == 160.0
    assert machine.timed_out(160.0 + TIMEOUT - 1, TIMEOUT) == []


def test_settled_files_ignore_reconnects_resyncs_and_timeouts() -> None:
    machine = transfer()
    machine.settled(Ack(FILE_ID, "rejected", [], None, "no"))
    assert machine.reconnected(200.0) == [] and machine.resync(200.0) == []
    assert machine.timed_out(1e9, TIMEOUT) == []


# -- read-ahead planning ------------------------------------------------------------------------------


def test_upcoming_names_the_next_chunks_that_will_be_sent() -> None:
    machine = transfer(chunks=10)
    machine.chunk_sent(1, 100.0)
    machine.receiving(receiving([[3, 4]]), now=101.0)
    assert machine.upcoming(0, limit=4) == [2, 5, 6, 7]
    assert machine.upcoming(8, limit=4) == [9]
