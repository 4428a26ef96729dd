"""A consumer group member (KIP-848), as a state machine without I/O: shared by Consumer and AsyncConsumer.

The coordinator computes assignments; the member only reports what it owns and follows what it is told:

- It joins by heartbeating with epoch 0 and its subscription, then heartbeats every interval the coordinator
  names (100 ms while it is short of its target) with its epoch and exactly the partitions it owns now.
- When an answer carries an assignment, the partitions the member owns outside it are revoked (auto-commit
  commits them, on_revoked runs, fetching stops) and only then reported released; partitions new to it are
  taken (positions from the committed offsets, on_assigned). Both are done by the application side (poll),
  which tells this machine through revoked() and assigned(); the next heartbeat then goes out at once, so
  a released partition reaches its new owner in milliseconds.
- UNKNOWN_MEMBER_ID or FENCED_MEMBER_EPOCH: the coordinator has given the partitions to others, so all are
  lost at once, without a commit, and the member rejoins with epoch 0. The same happens when no heartbeat
  has succeeded for the session timeout (the coordinator has dropped the member by then).
- A member that has not been polled for max_poll_interval_ms leaves, losing its partitions; poll rejoins.
- Leaving: epoch -1, or -2 for a static member stopping for a restart (it keeps its partitions until its
  session times out, so a restart gets them back without a reassignment).

The I/O layers (consumer.py, aio.py) send what heartbeat_request() builds, feed the answers back, and act
on reconciliation(). Times are milliseconds from any monotonic clock, passed in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from logbroker_client.errors import (
    FencedMemberEpochError,
    LogbrokerError,
    UnknownMemberIdError,
    error_for,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import OffsetAndMetadata, TopicPartition

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2
SIMPLE_MEMBER_EPOCH = -1  # a commit from outside any membership: assign() plus commit()
FIRST_RETRY_BACKOFF_MS = 100
MAX_RETRY_BACKOFF_MS = 1_000
UNANSWERED_INTERVAL_MS = 1_000  # between heartbeats before the coordinator has named an interval

Partitions = frozenset[TopicPartition]
NOTHING: Partitions = frozenset()


STALE_EPOCH_WAIT_S = 2.0  # how long a commit refused for a stale epoch waits for the heartbeat's new epoch
STALE_EPOCH_POLL_S = 0.01

class MemberState(Enum):
    IDLE = "idle"  # not subscribed: commits, if any, are a simple group's (member "", epoch -1)
    JOINING = "joining"  # the next heartbeat carries epoch 0
    MEMBER = "member"  # in the group, heartbeating with its epoch
    STALE = "stale"  # left because poll() was not called within max_poll_interval_ms; poll() rejoins
    FAILED = "failed"  # a fatal error (poll raises it)
    LEFT = "left"  # closed


@dataclass(frozen=True)
class Subscription:
    topics: tuple[str, ...] = ()
    pattern: str = ""  # a regular expression matched against whole topic names

    def __post_init__(self) -> None:
        if not self.topics and not self.pattern:
            raise ValueError("subscribe to at least one topic, or give a pattern")


Callback = Callable[[set[TopicPartition]], Any]


@dataclass(frozen=True)
class RebalanceListener:
    """The application's callbacks; the consumers call them from poll() (never from the heartbeat)."""

    on_assigned: Callback | None = None
    on_revoked: Callback | None = None
    on_lost: Callback | None = None

    def lost_callback(self) -> Callback | None:
        return self.on_lost or self.on_revoked  # Kafka's default for onPartitionsLost


class Reconciliation(NamedTuple):
    """What the application side does next, in this order."""

    lost: Partitions  # taken away: stop fetching, no commit, on_lost
    revoke: Partitions  # to give up: commit (auto-commit), on_revoked, stop fetching, then revoked()
    assign: Partitions  # to take: positions from committed offsets, start fetching, assigned(), on_assigned

    def __bool__(self) -> bool:
        return bool(self.lost or self.revoke or self.assign)


def partitions_to_pb(tps: Iterable[TopicPartition]) -> list[pb.TopicPartitions]:
    by_topic: dict[str, list[int]] = {}
    for topic, partition in sorted(tps):
        by_topic.setdefault(topic, []).append(partition)
    return [pb.TopicPartitions(topic=topic, partitions=parts) for topic, parts in by_topic.items()]


def partitions_from_pb(items: Iterable[pb.TopicPartitions]) -> Partitions:
    return frozenset(TopicPartition(item.topic, p) for item in items for p in item.partitions)


def commit_entries(offsets: Mapping[TopicPartition, int | OffsetAndMetadata]) -> list[pb.OffsetToCommit]:
    entries = []
    for tp, value in offsets.items():
        committed = value if isinstance(value, OffsetAndMetadata) else OffsetAndMetadata(value)
        entries.append(pb.OffsetToCommit(topic=tp[0], partition=tp[1], offset=committed.offset,
                                         metadata=committed.metadata))
    return entries


class AutoCommitTimer:
    """enable_auto_commit: commit what poll() has handed out every interval (checked on each poll)."""

    def __init__(self, enabled: bool, interval_ms: int, now_ms: float) -> None:
        if interval_ms < 1:
            raise ValueError(f"auto_commit_interval_ms must be at least 1, got {interval_ms}")
        self.enabled = enabled
        self.interval_ms = interval_ms
        self.next_ms = now_ms + interval_ms

    def due(self, now_ms: float) -> bool:
        return self.enabled and now_ms >= self.next_ms

    def restart(self, now_ms: float) -> None:
        self.next_ms = now_ms + self.interval_ms


class GroupMember:
    def __init__(self, group_id: str, *, session_timeout_ms: int, rebalance_timeout_ms: int,
                 instance_id: str | None = None, client_id: str = "", client_host: str = "",
                 member_id: str | None = None) -> None:
        self.group_id = group_id
        self.member_id = member_id or uuid.uuid4().hex
        self.instance_id = instance_id or ""
        self.client_id = client_id
        self.client_host = client_host
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms  # max_poll_interval_ms, as Kafka's client sends it
        self.state = MemberState.IDLE
        self.epoch = JOIN_EPOCH
        self.subscription: Subscription | None = None
        self.owned: Partitions = NOTHING  # what the application consumes now, and every heartbeat reports
        self.target: Partitions | None = None  # the coordinator's last word (None: none since joining)
        self.lost: Partitions = NOTHING  # dropped here; the application has yet to stop fetching them
        self.fatal: LogbrokerError | None = None
        self.interval_ms = UNANSWERED_INTERVAL_MS
        self.next_heartbeat_ms = 0.0
        self.last_success_ms = 0.0  # when the last heartbeat that was answered was sent
        self.last_poll_ms = 0.0
        self.heartbeats_sent = 0
        self._reported: Partitions | None = None  # owned, as the heartbeat in flight reports it
        self._sent_ms = 0.0
        self._send_full = True
        self._urgent = False
        self._backoff_ms = FIRST_RETRY_BACKOFF_MS

    # ------------------------------------------------------------------------------ subscription

    @property
    def subscribed(self) -> bool:
        return self.subscription is not None

    @property
    def active(self) -> bool:
        """Heartbeats go out (joining or in the group)."""
        return self.state in (MemberState.JOINING, MemberState.MEMBER)

    def subscribe(self, subscription: Subscription, now_ms: float) -> None:
        if self.state is MemberState.LEFT:
            raise LogbrokerError("subscribe() on a closed consumer")
        self.subscription = subscription
        self._send_full = True
        self.last_poll_ms = now_ms
        if self.state in (MemberState.IDLE, MemberState.STALE, MemberState.FAILED):
            self._start_joining(now_ms)
            self.last_success_ms = now_ms
        self.heartbeat_now()  # a changed subscription goes out at once

    def _start_joining(self, now_ms: float) -> None:
        self.state = MemberState.JOINING
        self.epoch = JOIN_EPOCH
        self.target = None
        self.fatal = None
        self.next_heartbeat_ms = now_ms

    # ---------------------------------------------------------------------------------- timing

    def heartbeat_delay_ms(self, now_ms: float) -> float | None:
        """How long until the next heartbeat is due (0: now); None when none is to be sent."""
        if not self.active:
            return None
        return max(0.0, self.next_heartbeat_ms - now_ms)

    def heartbeat_now(self) -> None:
        """The next heartbeat goes out at once (after the one in flight, if any, is answered)."""
        self._urgent = True
        self.next_heartbeat_ms = 0.0

    def poll_called(self, now_ms: float) -> None:
        self.last_poll_ms = now_ms
        if self.state is MemberState.STALE:
            self._start_joining(now_ms)
            self.last_success_ms = now_ms

    def poll_overdue(self, now_ms: float) -> bool:
        """poll() has not been called within max_poll_interval_ms: the member must leave (leave_request)."""
        return self.active and now_ms - self.last_poll_ms > self.rebalance_timeout_ms

    def check_session(self, now_ms: float) -> None:
        """No heartbeat answered for the session timeout: the coordinator has dropped this member and may
        have given its partitions to others, so they are lost (never committed) and the member rejoins."""
        if self.state is MemberState.MEMBER and now_ms - self.last_success_ms >= self.session_timeout_ms:
            self._lose_everything()
            self._start_joining(now_ms)

    def keep_owned(self, records: list[Any], now_ms: float) -> list[Any]:
        """The records about to be handed out (anything with .topic and .partition), less those of partitions a
        session that lapsed by now_ms lost (the process may have been paused since the last check)."""
        before = self.owned
        self.check_session(now_ms)
        owned = self.owned
        if owned == before:
            return records
        return [r for r in records if TopicPartition(r.topic, r.partition) in owned]

    # -------------------------------------------------------------------------------- heartbeats

    def heartbeat_request(self, now_ms: float) -> pb.GroupHeartbeatRequest:
        joining = self.state is MemberState.JOINING
        request = pb.GroupHeartbeatRequest(
            group_id=self.group_id, member_id=self.member_id, member_epoch=JOIN_EPOCH if joining else self.epoch,
            owned_partitions=partitions_to_pb(self.owned), full_request=self._send_full or joining)
        if request.full_request:
            self._describe_self(request)
        self._reported = self.owned
        self._sent_ms = now_ms
        self._urgent = False
        self.heartbeats_sent += 1
        self.next_heartbeat_ms = now_ms + self.interval_ms  # until the answer names the interval
        return request

    def _describe_self(self, request: pb.GroupHeartbeatRequest) -> None:
        assert self.subscription is not None
        request.instance_id = self.instance_id
        request.rebalance_timeout_ms = self.rebalance_timeout_ms
        request.subscribed_topic_names.extend(self.subscription.topics)
        request.subscribed_topic_regex = self.subscription.pattern
        request.client_id = self.client_id
        request.client_host = self.client_host

    def on_heartbeat_response(self, response: pb.GroupHeartbeatResponse, now_ms: float) -> None:
        if response.error_code:
            self.on_heartbeat_error(error_for(response.error_code, response.error_message), now_ms)
            return
        reported, self._reported = self._reported, None
        if not self.active:
            return  # left, failed or timed out while it was in flight
        self.state = MemberState.MEMBER
        self.epoch = response.member_epoch
        self.last_success_ms = self._sent_ms
        self._send_full = False
        self._backoff_ms = FIRST_RETRY_BACKOFF_MS
        self.interval_ms = response.heartbeat_interval_ms or self.interval_ms
        if response.has_assignment:
            self.target = partitions_from_pb(response.assignment)
        elif reported is not None:
            self.target = reported  # the coordinator's assignment is what the heartbeat reported
        self.next_heartbeat_ms = 0.0 if self._urgent else self._sent_ms + self.interval_ms

    def on_heartbeat_error(self, error: LogbrokerError, now_ms: float) -> None:
        """A heartbeat failed: coordinator moved or unreachable (retry), fenced (lose all, rejoin), or fatal."""
        self._reported = None
        if not self.active:
            return
        if isinstance(error, UnknownMemberIdError | FencedMemberEpochError):
            self._lose_everything()
            self._start_joining(now_ms)
            return
        if not error.retriable:
            self._lose_everything()
            self.state = MemberState.FAILED
            self.fatal = error
            return
        self._send_full = True  # the coordinator may be a new one: tell it everything again
        self.next_heartbeat_ms = now_ms + self._backoff_ms
        self._backoff_ms = min(self._backoff_ms * 2, MAX_RETRY_BACKOFF_MS)
        self.check_session(now_ms)

    def _lose_everything(self) -> None:
        self.lost |= self.owned
        self.owned = NOTHING
        self.target = None

    # -------------------------------------------------------------------------- reconciliation

    def reconciliation(self) -> Reconciliation:
        if self.target is None or self.state is not MemberState.MEMBER:
            return Reconciliation(self.lost, NOTHING, NOTHING)
        return Reconciliation(self.lost, self.owned - self.target, self.target - self.owned)

    def lost_handled(self, tps: Iterable[TopicPartition]) -> None:
        self.lost -= frozenset(tps)

    def revoked(self, tps: Iterable[TopicPartition]) -> None:
        """The application has released these: the next heartbeat (at once) reports them gone."""
        released = frozenset(tps)
        self.owned -= released
        self.lost -= released  # lost meanwhile, but already released: nothing more to do for them
        self.heartbeat_now()

    def accept(self, tps: Iterable[TopicPartition]) -> Partitions:
        """Of the partitions the application is about to take, those still assigned to it (a fencing may
        have happened while it read their committed offsets). Take exactly these, then call assigned()."""
        if self.state is not MemberState.MEMBER or self.target is None or self.lost:
            return NOTHING
        return frozenset(tps) & self.target - self.owned

    def assigned(self, tps: Iterable[TopicPartition]) -> None:
        self.owned |= frozenset(tps)
        self.heartbeat_now()

    # --------------------------------------------------------------------------------- commits

    def commit_request(self, offsets: Mapping[TopicPartition, int | OffsetAndMetadata]) -> pb.CommitOffsetsRequest:
        """Commits of a member carry its id and epoch (the coordinator refuses stale ones); without a
        subscription they are a simple group's (member "", epoch -1), refused while the group has members."""
        request = pb.CommitOffsetsRequest(group_id=self.group_id, offsets=commit_entries(offsets))
        if not self.subscribed:
            request.member_id, request.member_epoch = "", SIMPLE_MEMBER_EPOCH
            return request
        if self.state is not MemberState.MEMBER:
            raise UnknownMemberIdError(
                f"this consumer is not a member of group {self.group_id!r} now ({self.state.value}), so it owns "
                "no partition and nothing was committed; poll() until partitions are assigned, then commit")
        request.member_id, request.member_epoch = self.member_id, self.epoch
        return request

    def owned_offsets(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The positions a commit of "everything consumed" may carry: only partitions owned now."""
        if not self.subscribed:
            return dict(positions)
        return {tp: offset for tp, offset in positions.items() if tp in self.owned}

    # ----------------------------------------------------------------------------------- leaving

    def leave_request(self, *, for_restart: bool = True) -> pb.GroupHeartbeatRequest | None:
        """The heartbeat that leaves at once (None when the coordinator never heard of this member). A static
        member leaving for a restart sends epoch -2 and keeps its partitions for its session timeout."""
        was_heard = self.active and self.heartbeats_sent > 0
        self._lose_everything()
        self.lost = NOTHING
        self.state = MemberState.LEFT
        if not was_heard:
            return None
        epoch = STATIC_LEAVE_EPOCH if self.instance_id and for_restart else LEAVE_EPOCH
        return pb.GroupHeartbeatRequest(group_id=self.group_id, member_id=self.member_id, member_epoch=epoch,
                                        instance_id=self.instance_id)

    def leave_for_poll_timeout(self) -> pb.GroupHeartbeatRequest:
        """poll() was not called within max_poll_interval_ms: give the partitions up (lost: the application is
        stuck, so nothing is committed) and leave; the next poll() rejoins."""
        self._lose_everything()
        self.state = MemberState.STALE
        epoch = STATIC_LEAVE_EPOCH if self.instance_id else LEAVE_EPOCH
        return pb.GroupHeartbeatRequest(group_id=self.group_id, member_id=self.member_id, member_epoch=epoch,
                                        instance_id=self.instance_id)
