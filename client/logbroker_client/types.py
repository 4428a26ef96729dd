"""Plain value types shared by the producer, consumer and admin clients."""

from __future__ import annotations

from typing import NamedTuple

from logbroker_client.records import Record

ConsumerRecord = Record  # topic, partition, offset, timestamp, key, value, headers


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class RecordMetadata(NamedTuple):
    """Where an acknowledged record landed. offset is -1 under acks=0 (nobody answers)."""

    topic: str
    partition: int
    offset: int
    timestamp: int


class OffsetAndTimestamp(NamedTuple):
    offset: int
    timestamp: int


class PartitionInfo(NamedTuple):
    partition: int
    leader_id: int
    replicas: list[int]
    isr: list[int]
    log_start_offset: int
    high_watermark: int
    size_bytes: int
    # No live leader: nothing can be written or read. leader_id is then -1, and the offsets are the answering
    # broker's last knowledge (0 when it holds no replica).
    offline: bool = False
    # A replica move under way (`lb topic move-replicas`, `lb cluster drain`): the replica set it goes to
    # (empty when none), and the Raft group's voters and learners as its leader sees them.
    target_replicas: list[int] = []  # noqa: RUF012 - a NamedTuple default, never mutated
    voters: list[int] = []  # noqa: RUF012
    learners: list[int] = []  # noqa: RUF012


class ReplicaView(NamedTuple):
    """One broker's own replica of a partition, as that broker alone sees it (Admin.replica_views)."""
    node: int
    leader_id: int  # the leader it follows, -1 when it knows none
    log_end_offset: int
    high_watermark: int
    # It lost its data (a replaced disk, a deleted directory) and takes no part in elections until it has caught
    # up from a leader: acknowledged records it no longer holds must not lose an election.
    catching_up: bool
    # When it last saw its leader change (won an election, or learned of the leader it follows), in Unix
    # milliseconds; 0 when it knows no leader.
    leader_since_ms: int = 0


class TopicDescription(NamedTuple):
    name: str
    replication_factor: int
    configs: dict[str, str]
    partitions: list[PartitionInfo]


class OffsetAndMetadata(NamedTuple):
    """A committed position: the next offset to consume, and free text stored with it."""

    offset: int
    metadata: str = ""


class GroupListing(NamedTuple):
    group_id: str
    state: str  # "empty", "stable", "reconciling", "assigning"
    members: int


class MemberDescription(NamedTuple):
    member_id: str
    instance_id: str  # "" unless a static member (group_instance_id)
    client_id: str
    client_host: str
    member_epoch: int
    subscribed_topics: list[str]
    subscribed_pattern: str
    partitions: list[TopicPartition]  # owned now
    target: list[TopicPartition]  # where the coordinator is moving it


class PartitionLag(NamedTuple):
    """One partition of a group: its committed offset, the log end, and how far the group is behind."""

    topic: str
    partition: int
    committed: int | None  # None: nothing committed yet
    log_end: int | None  # the high watermark; None when the partition's leader could not be asked
    lag: int | None  # log_end - committed, never below 0; None when either is unknown
    member_id: str | None  # the member that owns it now, if any
    metadata: str = ""


class GroupDescription(NamedTuple):
    group_id: str
    state: str
    group_epoch: int
    assignor: str
    coordinator_id: int
    members: list[MemberDescription]
    partitions: list[PartitionLag]  # committed ones, and owned ones not yet committed

    @property
    def total_lag(self) -> int:
        return sum(p.lag or 0 for p in self.partitions)


class OffsetChange(NamedTuple):
    """One partition of a reset: where the group's committed offset was and where it goes."""

    topic: str
    partition: int
    previous: int | None  # None: nothing was committed
    new: int


class SharePartitionStatus(NamedTuple):
    """One partition of a queue, as a share group sees it."""

    topic: str
    partition: int
    start_offset: int  # every record below it is finished
    available: int  # queue depth: records ready for delivery now, the group's unread log included
    in_flight: int  # acquired by members and not finished yet
    delayed: int  # released with a delay, backing off after a failure, or with a delivery time still ahead
    oldest_available_age_ms: int  # how long the oldest available record has waited (0 when none is available)
    dead_lettered: int  # records this group sent to its dead-letter topic
    in_flight_by_member: dict[str, int]  # member id -> records it holds


class ShareGroupDescription(NamedTuple):
    group_id: str
    partitions: list[SharePartitionStatus]

    @property
    def available(self) -> int:
        return sum(p.available for p in self.partitions)

    @property
    def in_flight(self) -> int:
        return sum(p.in_flight for p in self.partitions)

    @property
    def delayed(self) -> int:
        return sum(p.delayed for p in self.partitions)

    @property
    def dead_lettered(self) -> int:
        return sum(p.dead_lettered for p in self.partitions)

    def in_flight_by_member(self) -> dict[str, int]:
        """member id -> records it holds, over every partition described."""
        totals: dict[str, int] = {}
        for status in self.partitions:
            for member, count in status.in_flight_by_member.items():
                totals[member] = totals.get(member, 0) + count
        return totals
