"""The group coordinator of one __consumer_offsets partition: members, epochs, assignments, offsets.

Kafka's KIP-848 protocol, as a pure state machine (no I/O, time passed in):

- A member joins by heartbeating with epoch 0 and its subscription. Any change to the membership or to a
  subscription bumps the group epoch; the next heartbeat then computes a new target assignment on the
  broker with the group's assignor (uniform sticky by default) and stamps it with that epoch.
- Reconciliation is incremental. A member first gives up what its target no longer holds (the partitions
  leave its assignment and wait in ``revoking`` until the member reports it no longer owns them); only then
  does its epoch move to the target's. A partition is given to its new owner only once no other member
  owns or is releasing it, so a group never has two owners of a partition, and members whose partitions
  do not move keep consuming throughout.
- A member silent for the session timeout is removed; one that does not release a revoked partition
  within its rebalance timeout is fenced (removed). Either way its partitions become free.
- Offset commits are fenced by member epoch and ownership: a stale epoch, an unknown member or a
  partition the member does not own is refused, and nothing of the request is written.

Every change is a record (records.py) and the only way state changes is ``replay`` of a record: the
leader replays the records it proposes at once, followers replay them once committed, and a replica that
starts or loses leadership replays the log from its start. So every replica can take over at once.

The log stays bounded by snapshots: once the records written since the last snapshot pass
``snapshot_trigger_bytes`` and twice the live state's size, the leader writes a snapshot (a snapshot-start
record that clears the table, then every live key) and every replica may delete the log's segments below
that snapshot (prefix truncation; followers behind it are caught up by Raft's RESET_LOG).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from logbroker.groups import records as r
from logbroker.groups.assignors import DEFAULT_ASSIGNOR, MemberSpec, get_assignor
from logbroker.groups.classic import ClassicGroups
from logbroker.groups.errors import (
    FencedMemberEpoch,
    GroupIdNotFound,
    InvalidGroupId,
    InvalidGroupRequest,
    NonEmptyGroup,
    PartitionNotOwned,
    StaleMemberEpoch,
    UnknownMemberId,
    UnreleasedInstanceId,
)
from logbroker.groups.records import StateRecord

TP = tuple[str, int]

OFFSETS_TOPIC = "__consumer_offsets"
DEFAULT_SESSION_TIMEOUT_MS = 45_000  # Kafka's group.consumer.session.timeout.ms
DEFAULT_HEARTBEAT_INTERVAL_MS = 500  # Kafka: 5 s; a join settles within about one interval
# While a member is short of its target (waiting for others to release), it heartbeats this often, so a
# hand-over takes milliseconds rather than a heartbeat interval.
RECONCILE_HEARTBEAT_INTERVAL_MS = 100
DEFAULT_REBALANCE_TIMEOUT_MS = 300_000  # Kafka's max.poll.interval.ms, the default rebalance timeout
MAX_REBALANCE_TIMEOUT_MS = 30 * 60_000
DEFAULT_OFFSETS_RETENTION_MS = 7 * 24 * 3_600_000  # offsets.retention.minutes = 7 days
MAX_GROUP_ID_CHARS = 255
MAX_MEMBER_ID_CHARS = 255
MAX_MEMBERS_PER_GROUP = 1_000
MAX_METADATA_CHARS = 4_096
MAX_SUBSCRIBED_TOPICS = 10_000
DEFAULT_SNAPSHOT_TRIGGER_BYTES = 2 << 20
ESTIMATED_RECORD_BYTES = 120
LEAVE_EPOCH = -1
STATIC_LEAVE_EPOCH = -2


def partition_for_group(group_id: str, partitions: int) -> int:
    """The __consumer_offsets partition that holds a group: the same on every broker and every restart."""
    return zlib.crc32(group_id.encode()) % partitions


@dataclass(frozen=True)
class GroupConfig:
    session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS
    heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS
    offsets_retention_ms: int = DEFAULT_OFFSETS_RETENTION_MS
    snapshot_trigger_bytes: int = DEFAULT_SNAPSHOT_TRIGGER_BYTES


@dataclass(frozen=True)
class HeartbeatRequest:
    group_id: str
    member_id: str
    member_epoch: int
    instance_id: str = ""
    rebalance_timeout_ms: int = 0
    subscribed_topic_names: tuple[str, ...] = ()
    subscribed_topic_regex: str = ""
    server_assignor: str = ""
    owned_partitions: frozenset[TP] = frozenset()
    full_request: bool = False
    client_id: str = ""
    client_host: str = ""


@dataclass(frozen=True)
class HeartbeatResult:
    member_id: str
    member_epoch: int
    heartbeat_interval_ms: int
    assignment: frozenset[TP] | None  # None: unchanged from what the member reported owning


@dataclass(frozen=True)
class CommittedOffset:
    offset: int
    metadata: str
    commit_timestamp_ms: int


@dataclass
class Member:
    member_id: str
    instance_id: str = ""
    client_id: str = ""
    client_host: str = ""
    topics: tuple[str, ...] = ()
    regex: str = ""
    rebalance_timeout_ms: int = DEFAULT_REBALANCE_TIMEOUT_MS
    epoch: int = 0
    previous_epoch: int = -1
    assigned: frozenset[TP] = frozenset()  # may own now
    revoking: frozenset[TP] = frozenset()  # asked to release, not yet released
    away: bool = False  # a static member that left for a restart: keeps its partitions until its session ends
    # Volatile: not persisted; a new coordinator gives every member a fresh session.
    last_heartbeat_ms: int = 0
    revoke_deadline_ms: int | None = None

    def to_value(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "client_id": self.client_id, "client_host": self.client_host,
                "topics": list(self.topics), "regex": self.regex, "rebalance_timeout_ms": self.rebalance_timeout_ms,
                "epoch": self.epoch, "previous_epoch": self.previous_epoch, "assigned": _tps_out(self.assigned),
                "revoking": _tps_out(self.revoking), "away": self.away}

    @classmethod
    def from_value(cls, member_id: str, value: dict[str, Any]) -> Member:
        return cls(member_id, value["instance_id"], value["client_id"], value["client_host"],
                   tuple(value["topics"]), value["regex"], value["rebalance_timeout_ms"], value["epoch"],
                   value["previous_epoch"], _tps_in(value["assigned"]), _tps_in(value["revoking"]), value["away"])


@dataclass
class Group:
    group_id: str
    epoch: int = 0
    assignment_epoch: int = 0
    assignor: str = DEFAULT_ASSIGNOR
    topology: str = ""  # the subscribed topics' partition counts when the target was computed
    members: dict[str, Member] = field(default_factory=dict)
    targets: dict[str, frozenset[TP]] = field(default_factory=dict)
    offsets: dict[TP, CommittedOffset] = field(default_factory=dict)
    exists: bool = False  # has a group record (members or an assignment history), not only offsets
    empty_since_ms: int = 0  # volatile: when the last member left (offsets expire from then)

    @property
    def state(self) -> str:
        if not self.members:
            return "empty"
        if self.epoch > self.assignment_epoch:
            return "assigning"
        for member in self.members.values():
            if member.revoking or member.epoch != self.assignment_epoch or \
                    member.assigned != self.targets.get(member.member_id, frozenset()):
                return "reconciling"
        return "stable"

    def owners(self, exclude: str) -> set[TP]:
        """Partitions owned or being released by members other than ``exclude``."""
        owned: set[TP] = set()
        for member in self.members.values():
            if member.member_id != exclude:
                owned |= member.assigned
                owned |= member.revoking
        return owned


def _tps_out(tps: Iterable[TP]) -> list[list[Any]]:
    return [[t, p] for t, p in sorted(tps)]


def _tps_in(items: Iterable[Sequence[Any]]) -> frozenset[TP]:
    return frozenset((str(t), int(p)) for t, p in items)


TopicCatalog = Callable[[], Mapping[str, int]]  # existing topic -> partition count


class GroupCoordinatorShard:
    """The groups of one __consumer_offsets partition."""

    def __init__(self, topics: TopicCatalog, config: GroupConfig | None = None,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.topics = topics
        self.config = config or GroupConfig()
        self.clock_ms = clock_ms
        self.groups: dict[str, Group] = {}
        self.classic = ClassicGroups(lambda: self.clock_ms(), self.replay)  # Kafka's classic protocol
        self.live_bytes = 0  # rough size of the live state, for the snapshot trigger
        self.bytes_since_snapshot = 0

    # ================================================================================ replay
    def replay(self, record: StateRecord) -> None:
        """Apply one record: the only way the state changes (leader and followers alike)."""
        key, value = record.key, record.value
        kind = key[0]
        # Only a trigger for snapshots: a record made here (not read back) counts as a typical size rather
        # than being encoded a second time.
        self.bytes_since_snapshot += record.size_bytes or ESTIMATED_RECORD_BYTES
        if kind == r.SNAPSHOT:
            self.groups.clear()
            self.classic.clear()
            self.bytes_since_snapshot = 0
            return
        if kind == r.SNAPSHOT_CHUNK:
            assert value is not None
            for item_key, item_value in value["items"]:
                self.replay(StateRecord(tuple(item_key), item_value, 1))
            return
        if kind == r.CLASSIC:
            self.classic.replay(str(key[1]), value)
            return
        group = self._group_for_replay(str(key[1]))
        if kind == r.OFFSET:
            tp = (str(key[2]), int(key[3]))
            if value is None:
                group.offsets.pop(tp, None)
            else:
                group.offsets[tp] = CommittedOffset(value["offset"], value["metadata"], value["ts"])
        elif kind == r.GROUP:
            self._replay_group(group, value)
        elif kind == r.MEMBER:
            self._replay_member(group, str(key[2]), value)
        elif kind == r.TARGET:
            if value is None:
                group.targets.pop(str(key[2]), None)
            else:
                group.targets[str(key[2])] = _tps_in(value["partitions"])
        self._drop_if_gone(group)

    def _group_for_replay(self, group_id: str) -> Group:
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = Group(group_id, empty_since_ms=self.clock_ms())
        return group

    @staticmethod
    def _replay_group(group: Group, value: dict[str, Any] | None) -> None:
        if value is None:
            group.exists = False
            group.members.clear()
            group.targets.clear()
            group.epoch = group.assignment_epoch = 0
            return
        group.exists = True
        group.epoch = value["epoch"]
        group.assignment_epoch = value["assignment_epoch"]
        group.assignor = value["assignor"]
        group.topology = value.get("topology", "")

    def _replay_member(self, group: Group, member_id: str, value: dict[str, Any] | None) -> None:
        old = group.members.get(member_id)
        if value is None:
            group.members.pop(member_id, None)
            if not group.members:
                group.empty_since_ms = self.clock_ms()
            return
        member = Member.from_value(member_id, value)
        if old is not None:  # volatile fields live on
            member.last_heartbeat_ms = old.last_heartbeat_ms
            member.revoke_deadline_ms = old.revoke_deadline_ms if member.revoking else None
        else:
            member.last_heartbeat_ms = self.clock_ms()
        group.members[member_id] = member

    def _drop_if_gone(self, group: Group) -> None:
        if not group.exists and not group.members and not group.offsets and not group.targets:
            self.groups.pop(group.group_id, None)

    def _emit(self, out: list[StateRecord], key: r.Key, value: dict[str, Any] | None) -> None:
        record = StateRecord(key, value)
        self.replay(record)
        out.append(record)

    def _emit_group(self, out: list[StateRecord], group: Group, **changes: Any) -> None:
        value = {"epoch": group.epoch, "assignment_epoch": group.assignment_epoch, "assignor": group.assignor,
                 "topology": group.topology, **changes}
        self._emit(out, (r.GROUP, group.group_id), value)

    def _emit_member(self, out: list[StateRecord], group: Group, member: Member) -> None:
        self._emit(out, (r.MEMBER, group.group_id, member.member_id), member.to_value())

    def _remove_member(self, out: list[StateRecord], group: Group, member_id: str) -> None:
        self._emit(out, (r.MEMBER, group.group_id, member_id), None)
        if member_id in group.targets:
            self._emit(out, (r.TARGET, group.group_id, member_id), None)
        self._emit_group(out, group, epoch=group.epoch + 1)

    # ============================================================================== heartbeat
    def heartbeat(self, req: HeartbeatRequest) -> tuple[HeartbeatResult, list[StateRecord]]:
        check_group_id(req.group_id)
        self.classic.refuse_if_classic(req.group_id)
        if not req.member_id or len(req.member_id) > MAX_MEMBER_ID_CHARS:
            raise InvalidGroupRequest(f"group {req.group_id!r}: a member id of 1 to {MAX_MEMBER_ID_CHARS} "
                                      f"characters is required, got {len(req.member_id)}")
        now_ms = self.clock_ms()
        out: list[StateRecord] = []
        if req.member_epoch in (LEAVE_EPOCH, STATIC_LEAVE_EPOCH):
            return self._leave(req, out), out
        group = self.groups.get(req.group_id)
        if req.member_epoch == 0:
            group, member = self._join(req, out)
        else:
            member = self._existing_member(group, req)
            assert group is not None
        member.last_heartbeat_ms = now_ms
        if req.full_request or req.member_epoch == 0:
            self._update_subscription(out, group, member, req)
        self._note_released(out, group, member, req.owned_partitions)
        self._refresh_target(out, group, req.server_assignor)
        assignment = self._reconcile(out, group, group.members[member.member_id], now_ms)
        member = group.members[member.member_id]
        behind = member.assigned != group.targets.get(member.member_id, frozenset()) or bool(member.revoking)
        interval = RECONCILE_HEARTBEAT_INTERVAL_MS if behind else self.config.heartbeat_interval_ms
        changed = assignment if assignment != req.owned_partitions or req.member_epoch == 0 else None
        return HeartbeatResult(member.member_id, member.epoch, interval, changed), out

    def _leave(self, req: HeartbeatRequest, out: list[StateRecord]) -> HeartbeatResult:
        group = self.groups.get(req.group_id)
        member = group.members.get(req.member_id) if group is not None else None
        if group is not None and member is not None:
            if req.member_epoch == STATIC_LEAVE_EPOCH and member.instance_id:
                member.away = True  # keeps its partitions for a restart within the session timeout
                self._emit_member(out, group, member)
            else:
                self._remove_member(out, group, member.member_id)
        return HeartbeatResult(req.member_id, req.member_epoch, self.config.heartbeat_interval_ms, None)

    def _join(self, req: HeartbeatRequest, out: list[StateRecord]) -> tuple[Group, Member]:
        group = self.groups.get(req.group_id)
        if group is None or not group.exists:
            group = self._group_for_replay(req.group_id)
            self._emit_group(out, group, epoch=group.epoch)
        if req.instance_id:
            replaced = self._take_over_static(out, group, req)
            if replaced is not None:
                return group, replaced
        member = group.members.get(req.member_id)
        if member is not None:
            # A known member rejoining (fenced, or it lost our answer): it owns nothing now.
            member.assigned = member.revoking = frozenset()
            member.epoch, member.previous_epoch, member.away = 0, -1, False
            self._emit_member(out, group, member)
            return group, member
        if len(group.members) >= MAX_MEMBERS_PER_GROUP:
            raise InvalidGroupRequest(f"group {req.group_id!r} already has {MAX_MEMBERS_PER_GROUP} members, the "
                                      "limit; add partitions and consumers to another group instead")
        member = Member(req.member_id, instance_id=req.instance_id)
        self._emit_member(out, group, member)
        self._emit_group(out, group, epoch=group.epoch + 1)
        return group, group.members[req.member_id]

    def _take_over_static(self, out: list[StateRecord], group: Group, req: HeartbeatRequest) -> Member | None:
        """A static member restarting under a new member id takes the old one's place and partitions."""
        holder = next((m for m in group.members.values() if m.instance_id == req.instance_id), None)
        if holder is None:
            return None
        if holder.member_id == req.member_id:
            holder.away = False
            self._emit_member(out, group, holder)
            return holder
        if not holder.away:
            raise UnreleasedInstanceId(
                f"group {group.group_id!r}: instance id {req.instance_id!r} is held by live member "
                f"{holder.member_id}; give each consumer its own group_instance_id")
        member = Member(req.member_id, holder.instance_id, holder.client_id, holder.client_host, holder.topics,
                        holder.regex, holder.rebalance_timeout_ms, holder.epoch, holder.previous_epoch,
                        holder.assigned, holder.revoking)
        target = group.targets.get(holder.member_id)
        self._emit(out, (r.MEMBER, group.group_id, holder.member_id), None)
        if target is not None:
            self._emit(out, (r.TARGET, group.group_id, holder.member_id), None)
            self._emit(out, (r.TARGET, group.group_id, member.member_id), {"partitions": _tps_out(target)})
        self._emit_member(out, group, member)
        return group.members[member.member_id]

    def _existing_member(self, group: Group | None, req: HeartbeatRequest) -> Member:
        member = group.members.get(req.member_id) if group is not None else None
        if member is None:
            raise UnknownMemberId(f"group {req.group_id!r}: member {req.member_id} is not in the group (its "
                                  "session expired or it was fenced); rejoin with epoch 0")
        if req.member_epoch == member.epoch:
            return member
        if req.member_epoch == member.previous_epoch and req.owned_partitions <= member.assigned:
            return member  # our last answer was lost: it is one step behind, harmlessly
        raise FencedMemberEpoch(f"group {req.group_id!r}: member {req.member_id} sent epoch {req.member_epoch}, "
                                f"the group knows it at {member.epoch}; release every partition and rejoin")

    def _update_subscription(self, out: list[StateRecord], group: Group, member: Member,
                             req: HeartbeatRequest) -> None:
        if len(req.subscribed_topic_names) > MAX_SUBSCRIBED_TOPICS:
            raise InvalidGroupRequest(f"a subscription may name at most {MAX_SUBSCRIBED_TOPICS} topics")
        if req.subscribed_topic_regex:
            try:
                re.compile(req.subscribed_topic_regex)
            except re.error as exc:
                raise InvalidGroupRequest(f"subscription pattern {req.subscribed_topic_regex!r} is not a valid "
                                          f"regular expression: {exc}") from None
        timeout_ms = req.rebalance_timeout_ms or DEFAULT_REBALANCE_TIMEOUT_MS
        if not 0 < timeout_ms <= MAX_REBALANCE_TIMEOUT_MS:
            raise InvalidGroupRequest(f"rebalance timeout {timeout_ms} ms is outside 1..{MAX_REBALANCE_TIMEOUT_MS}")
        topics = tuple(sorted(set(req.subscribed_topic_names)))
        details = (req.instance_id, req.client_id, req.client_host, timeout_ms)
        if (member.topics, member.regex) == (topics, req.subscribed_topic_regex) and \
                (member.instance_id, member.client_id, member.client_host, member.rebalance_timeout_ms) == details:
            return
        subscription_changed = (member.topics, member.regex) != (topics, req.subscribed_topic_regex)
        member.topics, member.regex = topics, req.subscribed_topic_regex
        member.instance_id, member.client_id, member.client_host, member.rebalance_timeout_ms = details
        self._emit_member(out, group, member)
        if subscription_changed:
            self._emit_group(out, group, epoch=group.epoch + 1)

    def _note_released(self, out: list[StateRecord], group: Group, member: Member, owned: frozenset[TP]) -> None:
        still = member.revoking & owned
        if still != member.revoking:
            member.revoking = still
            if not still:
                member.revoke_deadline_ms = None
            self._emit_member(out, group, member)

    # ============================================================================ assignment
    def subscribed_topics(self, member: Member, catalog: Mapping[str, int]) -> frozenset[str]:
        names = {t for t in member.topics if t in catalog}
        if member.regex:
            pattern = re.compile(member.regex)
            names |= {t for t in catalog if not t.startswith("__") and pattern.fullmatch(t)}
        return frozenset(names)

    def _refresh_target(self, out: list[StateRecord], group: Group, assignor_name: str) -> None:
        catalog = self.topics()
        subscriptions = {m.member_id: self.subscribed_topics(m, catalog) for m in group.members.values()}
        wanted = sorted(set().union(*subscriptions.values())) if subscriptions else []
        topology = ",".join(f"{t}:{catalog[t]}" for t in wanted)
        if assignor_name and assignor_name != group.assignor:
            get_assignor(assignor_name)  # refuses unknown names
            group.assignor = assignor_name
            group.epoch += 1
        if topology != group.topology:
            group.epoch += 1
        if group.epoch == group.assignment_epoch:
            return
        specs = [MemberSpec(m.member_id, m.instance_id or None, subscriptions[m.member_id],
                            group.targets.get(m.member_id, frozenset())) for m in group.members.values()]
        target = get_assignor(group.assignor).assign(specs, {t: catalog[t] for t in wanted})
        for member_id, partitions in sorted(target.items()):
            if group.targets.get(member_id) != partitions:
                self._emit(out, (r.TARGET, group.group_id, member_id), {"partitions": _tps_out(partitions)})
        self._emit_group(out, group, epoch=group.epoch, assignment_epoch=group.epoch, assignor=group.assignor,
                         topology=topology)

    def _reconcile(self, out: list[StateRecord], group: Group, member: Member, now_ms: int) -> frozenset[TP]:
        """Move the member towards its target: revocations first, then partitions nobody else holds."""
        target = group.targets.get(member.member_id, frozenset())
        keep = member.assigned & target
        revoke = member.assigned - target
        revoking = member.revoking | revoke
        free = target - keep - group.owners(exclude=member.member_id) - revoking
        assigned = keep | free
        epoch = member.epoch
        if not revoking and epoch != group.assignment_epoch:
            epoch = group.assignment_epoch  # everything it had to give up is given up
        if (assigned, revoking, epoch) != (member.assigned, member.revoking, member.epoch):
            if revoking and not member.revoking:
                member.revoke_deadline_ms = now_ms + member.rebalance_timeout_ms
            previous = member.epoch if epoch != member.epoch else member.previous_epoch
            member.assigned, member.revoking, member.epoch, member.previous_epoch = assigned, revoking, epoch, previous
            self._emit_member(out, group, member)
        return member.assigned

    # ================================================================================ offsets
    def commit(self, group_id: str, member_id: str, member_epoch: int,
               offsets: Sequence[tuple[str, int, int, str]]) -> list[StateRecord]:
        """Commit (topic, partition, offset, metadata) entries, all or none."""
        check_group_id(group_id)
        group = self.groups.get(group_id)
        self._check_committer(group_id, group, member_id, member_epoch, offsets)
        catalog = self.topics()
        for topic, partition, offset, metadata in offsets:
            if not 0 <= partition < catalog.get(topic, 0):
                raise InvalidGroupRequest(f"group {group_id!r}: {topic}-{partition} does not exist")
            if offset < 0:
                raise InvalidGroupRequest(f"group {group_id!r}: offset {offset} for {topic}-{partition} is "
                                          "negative; commit the next offset to consume (>= 0)")
            if len(metadata) > MAX_METADATA_CHARS:
                raise InvalidGroupRequest(f"group {group_id!r}: commit metadata is limited to "
                                          f"{MAX_METADATA_CHARS} characters")
        now_ms = self.clock_ms()
        out: list[StateRecord] = []
        for topic, partition, offset, metadata in offsets:
            self._emit(out, (r.OFFSET, group_id, topic, partition),
                       {"offset": offset, "metadata": metadata, "ts": now_ms})
        return out

    @staticmethod
    def _check_committer(group_id: str, group: Group | None, member_id: str, member_epoch: int,
                         offsets: Sequence[tuple[str, int, int, str]]) -> None:
        if not member_id and member_epoch < 0:
            if group is not None and group.members:
                raise NonEmptyGroup(f"group {group_id!r} has {len(group.members)} live member(s); only they may "
                                    "commit (stop them first to reset its offsets)")
            return
        member = group.members.get(member_id) if group is not None else None
        if member is None:
            raise UnknownMemberId(f"group {group_id!r}: member {member_id or '(none)'} is not in the group; "
                                  "nothing was committed")
        if member_epoch != member.epoch:
            error = StaleMemberEpoch if member_epoch < member.epoch else FencedMemberEpoch
            raise error(f"group {group_id!r}: member {member_id} committed with epoch {member_epoch}, the group "
                        f"knows it at {member.epoch}; nothing was committed")
        owned = member.assigned | member.revoking
        foreign = sorted({(t, p) for t, p, _, _ in offsets} - owned)
        if foreign:
            names = ", ".join(f"{t}-{p}" for t, p in foreign[:5])
            raise PartitionNotOwned(f"group {group_id!r}: member {member_id} does not own {names}; "
                                    "nothing was committed")

    def fetch_offsets(self, group_id: str, partitions: Iterable[TP] | None = None) -> dict[TP, CommittedOffset]:
        check_group_id(group_id)
        group = self.groups.get(group_id)
        if group is None:
            return {}
        if partitions is None:
            return dict(group.offsets)
        return {tp: group.offsets[tp] for tp in partitions if tp in group.offsets}

    def delete_group(self, group_id: str) -> list[StateRecord]:
        check_group_id(group_id)
        group = self.groups.get(group_id)
        classic = self.classic.delete(group_id)  # refuses while classic members are in it
        if group is None and not classic:
            raise GroupIdNotFound(f"group {group_id!r} does not exist")
        if group is not None and group.members:
            raise NonEmptyGroup(f"group {group_id!r} has {len(group.members)} live member(s); stop them first")
        out: list[StateRecord] = list(classic)
        if group is not None:
            self._drop_group(out, group)
        return out

    def _drop_group(self, out: list[StateRecord], group: Group) -> None:
        for topic, partition in sorted(group.offsets):
            self._emit(out, (r.OFFSET, group.group_id, topic, partition), None)
        for member_id in sorted(group.targets):
            self._emit(out, (r.TARGET, group.group_id, member_id), None)
        if group.group_id in self.groups:
            self._emit(out, (r.GROUP, group.group_id), None)

    def drop_topic(self, topic: str) -> list[StateRecord]:
        """A deleted topic takes its committed offsets with it."""
        out: list[StateRecord] = []
        for group in list(self.groups.values()):
            for tp in sorted(tp for tp in group.offsets if tp[0] == topic):
                self._emit(out, (r.OFFSET, group.group_id, *tp), None)
        return out

    # ================================================================================== time
    def fresh_sessions(self) -> None:
        """A new coordinator starts every member's session and rebalance deadline from now."""
        now_ms = self.clock_ms()
        for group in self.groups.values():
            for member in group.members.values():
                member.last_heartbeat_ms = now_ms
                if member.revoking:
                    member.revoke_deadline_ms = now_ms + member.rebalance_timeout_ms

    def expire(self) -> list[StateRecord]:
        """Members past their session or rebalance timeout, and the offsets of long-empty groups."""
        now_ms = self.clock_ms()
        out: list[StateRecord] = []
        for group in list(self.groups.values()):
            for member in list(group.members.values()):
                silent_ms = now_ms - member.last_heartbeat_ms
                late = member.revoke_deadline_ms is not None and now_ms > member.revoke_deadline_ms
                if silent_ms > self.config.session_timeout_ms or late:
                    self._remove_member(out, group, member.member_id)
            if not group.members and group.offsets and \
                    now_ms - group.empty_since_ms > self.config.offsets_retention_ms and \
                    not self.classic.has_members(group.group_id):
                self._drop_group(out, group)
        out.extend(self.classic.expire())
        return out

    # ============================================================================== snapshot
    def wants_snapshot(self) -> bool:
        return self.bytes_since_snapshot > max(self.config.snapshot_trigger_bytes, 2 * self.state_bytes())

    def state_bytes(self) -> int:
        return sum(len(r.encode_key(x.key)) + len(r.encode_value(x.value) or b"") for x in self._live_records())

    def take_snapshot(self) -> list[StateRecord]:
        """The snapshot to write now; the state is unchanged by it, so the leader need not replay it."""
        self.bytes_since_snapshot = 0
        return self.snapshot()

    def snapshot(self) -> list[StateRecord]:
        """A snapshot-start record, then every live key, SNAPSHOT_CHUNK_KEYS to a record (a new coordinator
        decodes a few hundred records for 10,000 groups, not 70,000): replaying these rebuilds the state."""
        items = [[list(x.key), x.value] for x in self._live_records()]
        chunks = [StateRecord((r.SNAPSHOT_CHUNK, i), {"items": items[i:i + r.SNAPSHOT_CHUNK_KEYS]})
                  for i in range(0, len(items), r.SNAPSHOT_CHUNK_KEYS)]
        return [StateRecord((r.SNAPSHOT,), {}), *chunks]

    def _live_records(self) -> list[StateRecord]:
        out: list[StateRecord] = []
        for group in sorted(self.groups.values(), key=lambda g: g.group_id):
            if group.exists:
                out.append(StateRecord((r.GROUP, group.group_id), {
                    "epoch": group.epoch, "assignment_epoch": group.assignment_epoch, "assignor": group.assignor,
                    "topology": group.topology}))
            for member in sorted(group.members.values(), key=lambda m: m.member_id):
                out.append(StateRecord((r.MEMBER, group.group_id, member.member_id), member.to_value()))
            for member_id, partitions in sorted(group.targets.items()):
                out.append(StateRecord((r.TARGET, group.group_id, member_id), {"partitions": _tps_out(partitions)}))
            for (topic, partition), committed in sorted(group.offsets.items()):
                out.append(StateRecord((r.OFFSET, group.group_id, topic, partition), {
                    "offset": committed.offset, "metadata": committed.metadata, "ts": committed.commit_timestamp_ms}))
        out.extend(self.classic.snapshot_records())
        return out


def check_group_id(group_id: str) -> None:
    if not group_id or len(group_id) > MAX_GROUP_ID_CHARS:
        raise InvalidGroupId(f"a group id must have 1 to {MAX_GROUP_ID_CHARS} characters, got {len(group_id)}")
    if not group_id.isprintable():
        raise InvalidGroupId(f"group id {group_id!r} has control characters")
