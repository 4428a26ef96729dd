"""Where a new topic's replicas go (logbroker.cluster.metadata.place_new_topic): over the live brokers when they
are enough, as Kafka places over unfenced brokers; else over every broker, and a partition that could not
elect a leader is named so that the create is refused before anything is recorded."""

from __future__ import annotations

from collections import Counter

from logbroker.cluster.metadata import place_new_topic


def test_replicas_go_to_live_brokers_only_when_they_are_enough() -> None:
    assignment, stranded = place_new_topic([1, 2, 3], live=[1, 2], partitions=4, replication_factor=2, salt=7)
    assert stranded == []
    assert all(sorted(replicas) == [1, 2] for replicas in assignment)  # nothing on broker 3, which is down
    assert Counter(replicas[0] for replicas in assignment) == {1: 2, 2: 2}  # preferred leaders still spread


def test_with_fewer_live_brokers_than_replicas_every_broker_holds_replicas_and_a_majority_is_enough() -> None:
    assignment, stranded = place_new_topic([1, 2, 3], live=[1, 2], partitions=3, replication_factor=3, salt=0)
    assert stranded == [] and all(sorted(replicas) == [1, 2, 3] for replicas in assignment)


def test_partitions_without_a_live_majority_are_named() -> None:
    assignment, stranded = place_new_topic([1, 2, 3, 4, 5], live=[1, 2, 3], partitions=5, replication_factor=4,
                                           salt=0)
    assert stranded, assignment
    for index in stranded:
        assert sum(node in (1, 2, 3) for node in assignment[index]) < 3  # two of four alive: no majority
    for index in set(range(5)) - set(stranded):
        assert sum(node in (1, 2, 3) for node in assignment[index]) >= 3
