"""Broker liveness: one heartbeat per peer per tick; silence past the timeout declares a peer down once."""

from __future__ import annotations

from logbroker.cluster.liveness import LIVENESS_GROUP, Liveness
from logbroker.raft.types import MessageType


def test_a_broker_sends_one_heartbeat_to_each_peer_per_tick() -> None:
    liveness = Liveness(1, [1, 2, 3], timeout_ticks=3)
    beats = liveness.heartbeats(metadata_term=0, disk_registered=True)
    assert [(group, m.type, m.from_node, m.to_node) for group, m in beats] == [
        (LIVENESS_GROUP, MessageType.HEARTBEAT, 1, 2), (LIVENESS_GROUP, MessageType.HEARTBEAT, 1, 3)]


def test_a_peer_is_taken_at_its_word_on_whether_its_disk_is_registered() -> None:
    starting, controller = Liveness(2, [1, 2], timeout_ticks=3), Liveness(1, [1, 2], timeout_ticks=3)
    assert controller.says_disk_registered(2)  # not heard from yet: the metadata decides alone

    [(_, beat)] = starting.heartbeats(metadata_term=4, disk_registered=False)
    assert beat.term == 4
    controller.note_heartbeat(beat)
    assert not controller.says_disk_registered(2)

    [(_, beat)] = starting.heartbeats(metadata_term=4, disk_registered=True)
    controller.note_heartbeat(beat)
    assert controller.says_disk_registered(2)


def test_a_peer_silent_past_the_timeout_is_declared_down_once() -> None:
    liveness = Liveness(1, [1, 2, 3], timeout_ticks=3)
    for _ in range(3):
        liveness.heard_from(3)
        assert liveness.tick() == []
    liveness.heard_from(3)
    assert liveness.tick() == [2]
    assert not liveness.is_alive(2) and liveness.is_alive(3) and liveness.is_alive(1)
    assert liveness.tick() == []  # reported once, not on every tick


def test_a_peer_heard_from_again_is_alive_and_can_go_down_again() -> None:
    liveness = Liveness(1, [1, 2], timeout_ticks=1)
    liveness.tick()
    assert liveness.tick() == [2]
    liveness.heard_from(2)
    assert liveness.is_alive(2)
    liveness.tick()
    assert liveness.tick() == [2]


def test_a_peer_heard_from_after_being_declared_down_is_reported_back_once() -> None:
    liveness = Liveness(1, [1, 2, 3], timeout_ticks=1)
    assert not liveness.heard_from(3)  # alive all along: never reported back
    liveness.tick()
    assert not liveness.heard_from(3)
    assert liveness.tick() == [2]
    assert liveness.heard_from(2) and liveness.is_alive(2)
    assert not liveness.heard_from(2)
